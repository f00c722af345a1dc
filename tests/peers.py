"""Copy weights from torch.nn's Transformer modules into mmt's, for parity tests."""

import torch
from torch import nn

from mmt.layers.attention import MultiHeadAttention
from mmt.layers.transformer import DecoderLayer, EncoderLayer, FeedForward


@torch.no_grad()
def copy_attention(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    wq, wk, wv = theirs.in_proj_weight.chunk(3)
    bq, bk, bv = theirs.in_proj_bias.chunk(3)
    for proj, w, b in ((ours.q_proj, wq, bq), (ours.k_proj, wk, bk), (ours.v_proj, wv, bv)):
        proj.weight.copy_(w)
        proj.bias.copy_(b)
    ours.out_proj.weight.copy_(theirs.out_proj.weight)
    ours.out_proj.bias.copy_(theirs.out_proj.bias)


@torch.no_grad()
def copy_ffn(ours: FeedForward, theirs: nn.Module) -> None:
    ours.fc1.load_state_dict(theirs.linear1.state_dict())
    ours.fc2.load_state_dict(theirs.linear2.state_dict())


@torch.no_grad()
def copy_encoder_layer(ours: EncoderLayer, theirs: nn.TransformerEncoderLayer) -> None:
    copy_attention(ours.attn, theirs.self_attn)
    copy_ffn(ours.ffn, theirs)
    ours.norm1.load_state_dict(theirs.norm1.state_dict())
    ours.norm2.load_state_dict(theirs.norm2.state_dict())


@torch.no_grad()
def copy_decoder_layer(ours: DecoderLayer, theirs: nn.TransformerDecoderLayer) -> None:
    copy_attention(ours.self_attn, theirs.self_attn)
    copy_attention(ours.cross_attn, theirs.multihead_attn)
    copy_ffn(ours.ffn, theirs)
    for name in ("norm1", "norm2", "norm3"):
        getattr(ours, name).load_state_dict(getattr(theirs, name).state_dict())


def randomise_norms(module: nn.Module) -> None:
    """LayerNorms start as identity; give them random affine weights so copying them matters."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
