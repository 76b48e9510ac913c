"""head: the classifier only; the encoder runs without autograd."""

from .core import Method


def head_trainable(name: str, spec=None) -> bool:
    """The classifier head only."""
    return name.startswith("head.")


METHOD = Method(
    name="head",
    summary="the classifier head only (the encoder runs without autograd)",
    trainable=head_trainable,
    default_lr=2e-3,
    default_steps=600,
    row_mixable=True,
    trains_encoder=False,
)
REGISTER = (METHOD,)
