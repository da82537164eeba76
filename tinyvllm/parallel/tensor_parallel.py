"""Tensor parallelism, Megatron style: each of N devices holds 1/N of every layer's heads and MLP columns, and the
devices meet once per attention block and once per MLP block.

A linear layer y = x·Wᵀ, with W stored [out, in], can be split across devices two ways:

    column-parallel   W split by rows (axis 0, output features): device i computes y_i = x·W_iᵀ, its slice of y.
                      Needs all of x; leaves y split.
    row-parallel      W split by columns (axis 1, input features): device i computes x_i·W_iᵀ from its slice of x,
                      a partial sum of all of y; the sum over devices is an all-reduce.

Megatron chains them so that the split output of one layer is exactly the split input of the next:

    attention   q/k/v column-parallel: a device gets whole heads, its query heads together with the K/V heads they
                share (GQA groups never straddle devices), attends over them alone, and keeps their K/V in its own
                slice of the paged pool → o_proj row-parallel → all-reduce
    MLP         gate/up column-parallel → silu(gate)·up is elementwise, so it stays split → down_proj row-parallel
                → all-reduce

So two all-reduces per layer, nothing else crosses devices. Embeddings, norms, RoPE tables and lm_head are
replicated: each device needs them whole, and they are small next to the layers (lm_head could be split by vocab).

tinygrad does the bookkeeping: `Tensor.shard(devices, axis)` makes one tensor that lives in N pieces, operations on
it run per device, and a sum over a sharded axis (the matmul of a row-parallel layer) becomes the all-reduce. There is
no communication code here, and the model code is the same for one device or N: shapes stay global.

The split layers stay unfused (see `fuse_projections` in llama.py): an axis-0 split of a stacked [q; k; v] weight
would give the first device all of q and the last all of v, not each device its own heads of all three.
"""
from __future__ import annotations
from collections.abc import Callable
from typing import TYPE_CHECKING
from tinygrad import Tensor
from tinygrad.device import canonicalize_device
from tinygrad.nn.state import get_state_dict
from tinyvllm.model.config import ModelConfig
if TYPE_CHECKING: from tinyvllm.model.llama import LlamaForCausalLM

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")   # weight (and bias) split on axis 0
ROW_PARALLEL = ("o_proj", "down_proj")     # weight split on axis 1; bias-free in every supported architecture


def check_divisible(cfg: ModelConfig, n: int) -> None:
  """ValueError, naming the config field, when the heads or MLP columns do not split evenly `n` ways (packed weights
  have further conditions: `quantized.check_split`)."""
  for field, value in (("num_attention_heads", cfg.num_heads), ("num_key_value_heads", cfg.num_kv_heads),
                       ("intermediate_size", cfg.intermediate_size)):
    if value % n: raise ValueError(f"tensor_parallel_size={n} does not divide the model's {field}={value}: "
                                   f"each device must get a whole share of it")


def shard_model(model: LlamaForCausalLM, devices: tuple[str, ...]) -> None:
  """Split the (loaded, unfused) weights across `devices` in place, by their Hugging Face names. A packed weight's
  tensors (quants [N/16, K/32, ...], scales [N/16, K/32, 16]) split on the same axes as the float [N, K] matrix.
  `check_divisible` (and `quantized.check_split`) have vetted the split (load_model runs them before loading)."""
  for name, param in get_state_dict(model).items():
    parts = name.split(".")       # "model.layers.0.self_attn.q_proj.weight", packed: "...q_proj.weight.qs"
    axis = 0 if any(p in COLUMN_PARALLEL for p in parts) else 1 if any(p in ROW_PARALLEL for p in parts) else None
    param.shard_(devices, axis).realize()                 # axis None: a full copy on every device


def allocate_split(make: Callable[..., Tensor], shape: tuple[int, ...], axis: int | None, device: str | tuple[str, ...],
                   dtype) -> Tensor:
  """`make(*shape)` (Tensor.zeros, Tensor.empty) on `device`; on several devices split on `axis` (None: whole on
  each), every device allocating only its own share (`.shard` would first allocate all of it on one)."""
  device = canonicalize_device(device)                    # a tuple of one device comes back as its plain name
  if isinstance(device, str) or axis is None: return make(*shape, dtype=dtype, device=device)
  local = tuple(n // len(device) if i == axis else n for i, n in enumerate(shape))
  return Tensor(make(*local, dtype=dtype, device=device).uop.unshard(axis))
