"""Where models run: the GPU when CUDA is present, else the CPU; served indexes follow where FAISS has GPU support.

`LOCKSTEP_DEVICE=auto` picks CUDA when torch sees a GPU; `cpu` and `cuda` force one.
Serving, builds, shard encoding and training all resolve their device here.
A FAISS index moves to the GPU only with a faiss-gpu build (the `gpu` extra) and an
index type FAISS can clone there (Flat, IVF); anything else keeps serving from the
CPU copy, and the log says so.
"""

from __future__ import annotations

import logging
from typing import Literal

import faiss
import torch

from training.errors import InvalidInput

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]


def resolve_device(requested: Device) -> str:
    """The torch device a release is served on for the `LOCKSTEP_DEVICE` setting."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("LOCKSTEP_DEVICE=cuda but torch sees no GPU; install a CUDA build of torch or use auto/cpu")
    return requested


def faiss_has_gpu() -> bool:
    """True when this FAISS build can place indexes on a GPU and one is visible."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def index_to_gpu(index: faiss.Index, factory: str) -> faiss.Index:
    """A GPU copy of `index` for searching, or `index` itself where FAISS cannot clone this type to the GPU."""
    if not faiss_has_gpu():
        log.info("FAISS has no GPU support here; the %s index is searched on the CPU (install the gpu extra)", factory)
        return index
    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    except RuntimeError as exc:
        log.warning("the %s index cannot move to the GPU (%s); it is searched on the CPU", factory, exc)
        return index
