"""Lyric tokenisation: per-line language detection, normalisation and BPE ids."""
