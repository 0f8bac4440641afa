"""Torch modules of ACE-Step v1: they know nothing of sampling or serving."""
