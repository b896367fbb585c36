"""Weights between a Hugging Face folder and megatron-core's layout for any TP x PP, one tensor at a time.

    HF -> Megatron (rank tp t, pipeline stage p):
      q, k, v  -> linear_qkv: for each of this rank's key/value groups g, [q heads of g | k_g | v_g]
                  (the GQA interleaving megatron's attention splits), weight and (Qwen2) bias
      o        -> linear_proj: columns t of TP (row parallel)
      gate, up -> linear_fc1: [gate rows t | up rows t] (SwiGLU fused, column parallel)
      down     -> linear_fc2: columns t of TP
      embed / lm_head -> rows t of the vocabulary padded to a multiple of 128 x TP (zeros in the padding)
      layer L  -> stage L // (layers / PP), local index L % (layers / PP)
      norms (and Qwen3's q/k norms) are whole on every TP rank of their stage
      mixtures of experts (EP ranks e): the router (and DeepSeek's expert bias) whole everywhere; expert i on EP
                  rank i // (E / EP) as its local expert i % (E / EP), its gate/up/down split over TP as the dense
                  MLP's; DeepSeek's shared experts as a dense MLP on every EP rank
      latent attention (DeepSeek): q_proj or q_b, kv_b -> linear_q_proj / linear_q_up_proj, linear_kv_up_proj
                  split over TP by heads; the down projections q_a, kv_a and the latent norms whole on every rank

A converted folder holds mp_rank_{t:02d}_{p:03d}/model.safetensors (mp_rank_{t:02d}_{p:03d}_{e:03d} with expert
parallelism, each holding its experts and a copy of everything else), megatron.json (layout, padded
vocabulary, the HF config) and the HF config and tokenizer files for the way back. Reading goes
through safetensors' lazy handles and writing one rank (or one HF shard) at a time, so peak memory
is one rank's shard, never the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r1cli.backends.megatron.families import MEGATRON, Shape, check_layout, padded_vocab
from r1cli.errors import R1Error

LAYOUT_FILE = "megatron.json"
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")


class TensorFolder:
    """name -> tensor over every *.safetensors file of a folder, read lazily one tensor at a time."""

    def __init__(self, folder: Path):
        self.files = sorted(Path(folder).glob("*.safetensors"))
        if not self.files:
            raise R1Error(f"{folder}: no *.safetensors files")
        self.where: dict[str, Path] = {}
        for f in self.files:
            with safe_open(f, "pt") as h:
                for name in h.keys():
                    self.where[name] = f

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise R1Error(f"{self.files[0].parent}: no tensor named {name!r}")
        with safe_open(self.where[name], "pt") as h:
            return h.get_tensor(name)


def stage_of(layer: int, layers: int, pp: int) -> tuple[int, int]:
    per = layers // pp
    return layer // per, layer % per


def _qkv_shard(q, k, v, s: Shape, tp: int, t: int) -> torch.Tensor:
    hd, per = s.head_dim, s.heads // s.kv_heads
    groups = range(t * s.kv_heads // tp, (t + 1) * s.kv_heads // tp)
    parts = []
    for g in groups:
        parts += [q[g * per * hd:(g + 1) * per * hd], k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]]
    return torch.cat(parts)


def _qkv_unshard(shards: list[torch.Tensor], s: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hd, per = s.head_dim, s.heads // s.kv_heads
    q, k, v = [], [], []
    for shard in shards:
        for group in shard.split((per + 2) * hd):
            q.append(group[:per * hd])
            k.append(group[per * hd:(per + 1) * hd])
            v.append(group[(per + 1) * hd:])
    return torch.cat(q), torch.cat(k), torch.cat(v)


def _vocab_rows(w: torch.Tensor, vocab_padded: int, tp: int, t: int) -> torch.Tensor:
    pad = torch.zeros(vocab_padded - w.shape[0], *w.shape[1:], dtype=w.dtype)
    rows = vocab_padded // tp
    return torch.cat([w, pad])[t * rows:(t + 1) * rows]


def _chunk(w: torch.Tensor, tp: int, t: int, dim: int) -> torch.Tensor:
    return w.chunk(tp, dim=dim)[t]


def _latent_shard(get, s: Shape, tp: int, t: int) -> dict[str, torch.Tensor]:
    """Latent attention's weights on TP rank t: the up projections split over TP by heads, the down projections
    and latent norms whole (every rank computes the latents, as Transformer Engine's MLA spec does)."""
    f, m = s.family, MEGATRON
    out = {m["kv_down"]: get(f.kv_a), m["kv_lnorm"]: get(f.kv_a_norm), m["kv_up"]: _chunk(get(f.kv_b), tp, t, 0)}
    if s.latent.q_rank:
        out.update({m["q_down"]: get(f.q_a), m["q_lnorm"]: get(f.q_a_norm), m["q_up"]: _chunk(get(f.q_b), tp, t, 0)})
    else:
        out[m["q_proj"]] = _chunk(get(f.q + ".weight"), tp, t, 0)
    return out


def _latent_unshard(per_rank, get0, s: Shape) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name less the layer prefix, tensor) of latent attention from its TP pieces (per_rank(name): the TP
    ranks' pieces, get0(name): a whole one)."""
    f, m = s.family, MEGATRON
    if s.latent.q_rank:
        yield f.q_a, get0(m["q_down"])
        yield f.q_a_norm, get0(m["q_lnorm"])
        yield f.q_b, torch.cat(per_rank(m["q_up"]))
    else:
        yield f.q + ".weight", torch.cat(per_rank(m["q_proj"]))
    yield f.kv_a, get0(m["kv_down"])
    yield f.kv_a_norm, get0(m["kv_lnorm"])
    yield f.kv_b, torch.cat(per_rank(m["kv_up"]))


def rank_state(hf: TensorFolder, s: Shape, tp: int, pp: int, t: int, p: int, ep: int = 1, e: int = 0
               ) -> dict[str, torch.Tensor]:
    """One (TP rank, stage, expert rank)'s megatron state dict, read from the HF tensors it needs."""
    f, m, vp = s.family, MEGATRON, padded_vocab(s.vocab, tp)
    out: dict[str, torch.Tensor] = {}
    if p == 0:
        out[m["embed"]] = _vocab_rows(hf.get(f.embed), vp, tp, t)
    for layer in range(s.layers):
        stage, local = stage_of(layer, s.layers, pp)
        if stage != p:
            continue
        src, dst = f"model.layers.{layer}.", f"decoder.layers.{local}."
        get = lambda name: hf.get(src + name)  # noqa: E731
        if s.latent is not None:
            out.update({dst + k: v for k, v in _latent_shard(get, s, tp, t).items()})
        else:
            out[dst + m["qkv"] + ".weight"] = _qkv_shard(get(f.q + ".weight"), get(f.k + ".weight"),
                                                         get(f.v + ".weight"), s, tp, t)
        if f.qkv_bias:
            out[dst + m["qkv"] + ".bias"] = _qkv_shard(get(f.q + ".bias"), get(f.k + ".bias"), get(f.v + ".bias"),
                                                       s, tp, t)
        if f.qk_norm:
            out[dst + m["q_norm"]] = get(f.q_norm)
            out[dst + m["k_norm"]] = get(f.k_norm)
        out[dst + m["proj"]] = _chunk(get(f.o), tp, t, 1)
        if s.is_moe(layer):
            out[dst + m["router"]] = get(f.router)
            if s.experts.bias:
                out[dst + m["router_bias"]] = get(f.router_bias)
            if s.experts.shared_ffn:
                out[dst + m["shared_fc1"]] = torch.cat([_chunk(get(f.shared_gate), tp, t, 0),
                                                        _chunk(get(f.shared_up), tp, t, 0)])
                out[dst + m["shared_fc2"]] = _chunk(get(f.shared_down), tp, t, 1)
            local = s.experts.count // ep
            for j in range(local):
                i = e * local + j
                out[dst + m["expert_fc1"].format(j=j)] = torch.cat([_chunk(get(f.expert_gate.format(e=i)), tp, t, 0),
                                                                    _chunk(get(f.expert_up.format(e=i)), tp, t, 0)])
                out[dst + m["expert_fc2"].format(j=j)] = _chunk(get(f.expert_down.format(e=i)), tp, t, 1)
        else:
            out[dst + m["fc1"]] = torch.cat([_chunk(get(f.gate), tp, t, 0), _chunk(get(f.up), tp, t, 0)])
            out[dst + m["fc2"]] = _chunk(get(f.down), tp, t, 1)
        out[dst + m["attn_norm"]] = get(f.attn_norm)
        out[dst + m["mlp_norm"]] = get(f.mlp_norm)
    if p == pp - 1:
        out[m["final_norm"]] = hf.get(f.final_norm)
        if not s.tied:
            out[m["output"]] = _vocab_rows(hf.get(f.lm_head), vp, tp, t)
        elif pp > 1:  # megatron keeps the tied output weight on the last stage as a copy of the embedding
            out[m["output"]] = _vocab_rows(hf.get(f.embed), vp, tp, t)
    return {k: v.contiguous() for k, v in out.items()}


def rank_dir(t: int, p: int, e: int | None = None) -> str:
    """A rank's folder: TP rank t, stage p, and (with expert parallelism) expert rank e."""
    return f"mp_rank_{t:02d}_{p:03d}" + (f"_{e:03d}" if e is not None else "")


def read_hf_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise R1Error(f"{folder}: no config.json (a Hugging Face model folder is needed)")
    return json.loads(path.read_text())


def copy_hf_side_files(src: Path, dst: Path) -> None:
    """The config, generation config and tokenizer files of an HF folder (everything but the weights)."""
    for name in HF_SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def publish(tmp: Path, dst: Path) -> None:
    """Swap a finished staging folder in for dst (the old dst stays until the new one is whole)."""
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def check_not_source(src: Path, dst: Path) -> None:
    """A conversion never writes over (or inside, or around) its own source, --overwrite or not."""
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise R1Error(f"{dst} is {'' if s == d else 'inside or around '}the source {src}: --overwrite would "
                      "replace the model being converted; write the conversion to another folder")


def staging_for(dst: Path, overwrite: bool) -> Path:
    """An empty `dst.tmp` to write into; refuses an existing dst unless overwrite."""
    if dst.exists() and not overwrite:
        raise R1Error(f"{dst} exists; pass --overwrite to replace it")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def hf_to_megatron(src: str | Path, dst: str | Path, tp: int, pp: int, overwrite: bool = False, ep: int = 1) -> Path:
    src, dst = Path(src), Path(dst)
    cfg = read_hf_config(src)
    s = Shape.from_hf(cfg)
    check_layout(s, tp, pp, ep=ep)
    hf = TensorFolder(src)
    check_not_source(src, dst)
    tmp = staging_for(dst, overwrite)
    for p in range(pp):
        for t in range(tp):
            for e in range(ep):
                d = tmp / rank_dir(t, p, e if ep > 1 else None)
                d.mkdir()
                save_file(rank_state(hf, s, tp, pp, t, p, ep, e), d / "model.safetensors")
    (tmp / "hf").mkdir()
    copy_hf_side_files(src, tmp / "hf")
    layout = {"tensor_parallel": tp, "pipeline_parallel": pp, "expert_parallel": ep, "model_type": s.model_type,
              "padded_vocab_size": padded_vocab(s.vocab, tp), "hf_config": cfg}
    (tmp / LAYOUT_FILE).write_text(json.dumps(layout, indent=1))
    publish(tmp, dst)
    return dst


def _hf_tensors(src: Path, s: Shape, tp: int, pp: int, ep: int = 1) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) in HF order, each gathered from the rank files that hold its pieces."""
    ranks = {(t, p, e): TensorFolder(src / rank_dir(t, p, e if ep > 1 else None))
             for t in range(tp) for p in range(pp) for e in range(ep)}
    return hf_tensors_from(lambda t, p, name, e=0: ranks[t, p, e].get(name), s, tp, pp, ep)


def hf_tensors_from(get, s: Shape, tp: int, pp: int, ep: int = 1) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) in HF order from `get(t, p, megatron_name, e)`: the piece (TP rank t, stage p, expert
    rank e) holds (e only for experts' weights). Pieces are asked for name by name, t = 0..TP-1 in a row, so a live
    model can gather each one on demand."""
    f, m = s.family, MEGATRON
    vocab_cat = lambda p, name: torch.cat([get(t, p, name) for t in range(tp)])[:s.vocab]  # noqa: E731
    yield f.embed, vocab_cat(0, m["embed"])
    for layer in range(s.layers):
        p, local = stage_of(layer, s.layers, pp)
        src_, dst = f"decoder.layers.{local}.", f"model.layers.{layer}."
        per_rank = lambda name: [get(t, p, src_ + name) for t in range(tp)]  # noqa: E731
        if s.latent is not None:
            for name, w in _latent_unshard(per_rank, lambda name: get(0, p, src_ + name), s):  # noqa: B023
                yield dst + name, w
        else:
            q, k, v = _qkv_unshard(per_rank(m["qkv"] + ".weight"), s)
            yield dst + f.q + ".weight", q
            yield dst + f.k + ".weight", k
            yield dst + f.v + ".weight", v
        if f.qkv_bias:
            qb, kb, vb = _qkv_unshard(per_rank(m["qkv"] + ".bias"), s)
            yield dst + f.q + ".bias", qb
            yield dst + f.k + ".bias", kb
            yield dst + f.v + ".bias", vb
        if f.qk_norm:
            yield dst + f.q_norm, get(0, p, src_ + m["q_norm"])
            yield dst + f.k_norm, get(0, p, src_ + m["k_norm"])
        yield dst + f.o, torch.cat(per_rank(m["proj"]), dim=1)
        if s.is_moe(layer):
            yield dst + f.router, get(0, p, src_ + m["router"])
            if s.experts.bias:
                yield dst + f.router_bias, get(0, p, src_ + m["router_bias"])
            local = s.experts.count // ep
            for i in range(s.experts.count):
                e, j = divmod(i, local)
                halves = [get(t, p, src_ + m["expert_fc1"].format(j=j), e).chunk(2) for t in range(tp)]
                yield dst + f.expert_gate.format(e=i), torch.cat([g for g, _ in halves])
                yield dst + f.expert_up.format(e=i), torch.cat([u for _, u in halves])
                yield dst + f.expert_down.format(e=i), torch.cat(
                    [get(t, p, src_ + m["expert_fc2"].format(j=j), e) for t in range(tp)], dim=1)
            if s.experts.shared_ffn:
                halves = [w.chunk(2) for w in per_rank(m["shared_fc1"])]
                yield dst + f.shared_gate, torch.cat([g for g, _ in halves])
                yield dst + f.shared_up, torch.cat([u for _, u in halves])
                yield dst + f.shared_down, torch.cat(per_rank(m["shared_fc2"]), dim=1)
        else:
            halves = [w.chunk(2) for w in per_rank(m["fc1"])]
            yield dst + f.gate, torch.cat([g for g, _ in halves])
            yield dst + f.up, torch.cat([u for _, u in halves])
            yield dst + f.down, torch.cat(per_rank(m["fc2"]), dim=1)
        yield dst + f.attn_norm, get(0, p, src_ + m["attn_norm"])
        yield dst + f.mlp_norm, get(0, p, src_ + m["mlp_norm"])
    yield f.final_norm, get(0, pp - 1, m["final_norm"])
    if not s.tied:
        yield f.lm_head, vocab_cat(pp - 1, m["output"])


def write_hf_shards(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path, shard_gb: float = 5.0) -> None:
    """(HF name, tensor) pairs into model.safetensors, or model-0000K.safetensors + index past `shard_gb`; holds
    one shard in memory at a time."""
    shard: dict[str, torch.Tensor] = {}
    size, total, files, index = 0, 0, [], {}

    def flush():
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        files.append(name)
        index.update({k: name for k in shard})

    for name, tensor in tensors:
        shard[name] = tensor.contiguous()
        size += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
        if size >= shard_gb * (1 << 30):
            flush()
            shard, size = {}, 0
    if shard or not files:
        flush()
    if len(files) == 1:
        (folder / files[0]).rename(folder / "model.safetensors")
    else:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))


def megatron_to_hf(src: str | Path, dst: str | Path, overwrite: bool = False, shard_gb: float = 5.0) -> Path:
    src, dst = Path(src), Path(dst)
    layout_path = src / LAYOUT_FILE
    if not layout_path.is_file():
        raise R1Error(f"{src}: no {LAYOUT_FILE} (not a folder written by `r1 convert hf-to-megatron`)")
    layout = json.loads(layout_path.read_text())
    s = Shape.from_hf(layout["hf_config"])
    tp, pp, ep = layout["tensor_parallel"], layout["pipeline_parallel"], layout.get("expert_parallel", 1)
    check_not_source(src, dst)
    tmp = staging_for(dst, overwrite)
    write_hf_shards(_hf_tensors(src, s, tp, pp, ep), tmp, shard_gb)
    for f in (src / "hf").iterdir():
        shutil.copy2(f, tmp / f.name)
    publish(tmp, dst)
    return dst
