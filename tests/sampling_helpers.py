"""Shared by the sampling tests' stand-in backends."""

from __future__ import annotations


class WithoutCodec:
    """The codec half of a ``ComponentBackend`` for stand-ins that serve only the encoders and the
    DiT: sampling never calls these three, so a call is a test failure, not a silent zero."""

    def encode_mel(self, mel):
        raise NotImplementedError

    def decode_latents(self, latents):
        raise NotImplementedError

    def vocode(self, mel):
        raise NotImplementedError
