"""Pure-PyTorch stand-in for OpenFold's CUDA kernel `attn_core_inplace_cuda`.

OpenFold v1.0's `_attention` calls `forward_(x, rows, cols)` for an in-place float32 softmax over
the last axis and `backward_(y, d_ov, v, rows, cols_out, cols_v)` for its gradient. Installed
beside the reference by tools/install_openfold_reference.sh; never imported by molfun_jax.
"""
import torch


def forward_(x: torch.Tensor, rows: int, cols: int) -> None:
    """In place: x <- softmax(x, dim=-1), computed in float32."""
    x.copy_(torch.softmax(x.float(), dim=-1).to(x.dtype))


def backward_(y: torch.Tensor, d_ov: torch.Tensor, v: torch.Tensor, rows: int, cols_out: int,
              cols_v: int) -> None:
    """In place: y <- (dy - sum_last(y * dy)) * y with dy = d_ov @ v^T (softmax gradient)."""
    dy = torch.matmul(d_ov, v.transpose(-1, -2)).float()
    yf = y.float()
    y.copy_(((dy - (yf * dy).sum(dim=-1, keepdim=True)) * yf).to(y.dtype))
