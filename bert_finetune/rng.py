"""Seeding, and every random number generator's state as plain bytes and tuples, so that a checkpoint
carries it through all_gather_object and loads it back with weights_only=True (exact resume)."""
import random

import numpy as np
import torch


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def get_state() -> dict:
    _, mt, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (mt.astype(np.uint32).tobytes(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state().numpy().tobytes()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes()
    return state


def set_state(state: dict):
    def tensor(b):
        return torch.frombuffer(bytearray(b), dtype=torch.uint8)
    random.setstate(_as_tuples(state["python"]))
    mt, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.frombuffer(mt, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
