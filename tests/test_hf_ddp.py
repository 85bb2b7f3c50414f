"""selfkd.integrations.hf on 2 processes (torchrun, gloo, CPU) with the real transformers/accelerate: DLB's
batches through the Trainer's distributed handling, the same training as one process on the union batch,
bit-identical resume from per-rank checkpoints, PS-KD's memory across ranks. One torchrun launch runs
every 2-rank training (tests/hf_worker.py); the 1-process twins run here."""
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")


import hf_worker  # noqa: E402
from hf_worker import BATCH, EPOCHS, N  # noqa: E402
from selfkd.errors import ConfigError  # noqa: E402
from selfkd.integrations.hf import STATE, SelfKDTrainer  # noqa: E402
from test_distributed import torchrun  # noqa: E402
from union import UnionSampler  # noqa: E402

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("hfddp")
    p = torchrun([str(HERE / "hf_worker.py"), str(out)], timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return out


def ranks(out: Path, name: str) -> list[dict]:
    got = [torch.load(out / name / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [g["world"] for g in got] == [2, 2]
    return got


def same_state(a: dict, b: dict) -> bool:
    def same(x, y):
        if isinstance(x, dict):
            return same_state(x, y)
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y

    return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())


class Twin(SelfKDTrainer):
    def _index_sampler(self, data):
        return UnionSampler(len(data), self.args.seed, BATCH)


def test_dlb_batches_survive_the_trainers_distributed_handling(ddp):
    """Each rank's batches are [its previous step's new rows | its new rows]; per epoch the two ranks'
    new rows cover the data set once, without overlap."""
    got = ranks(ddp, "dlb")
    steps = -(-N // 2 // BATCH)  # per epoch: 12 samples per rank in batches of 5, 5, 2
    news = {}
    for r, g in enumerate(got):
        batches = g["batches"]
        assert len(batches) == steps * EPOCHS
        prev = []
        for s, idx in enumerate(batches):
            rep, new = idx[: len(prev)], idx[len(prev):]
            assert rep == prev, (r, s)  # carried across the epoch boundary too (carry_over)
            assert len(new) == min(BATCH, N // 2 - (s % steps) * BATCH)
            news.setdefault(s // steps, []).append(new)
            prev = new
    for epoch, parts in news.items():
        flat = [i for p in parts for i in p]
        assert sorted(flat) == list(range(N)), epoch
        assert not set(sum(parts[:steps], [])) & set(sum(parts[steps:], []))  # rank 0's vs rank 1's
    assert news[0] != news[1]  # reshuffled per epoch
    # the logged parts are means over both ranks: the first step has no distillation term, so ce = loss
    logs = [[h for h in g["log"] if "selfkd/ce" in h] for g in got]
    assert logs[0] == logs[1] and len(logs[0]) == steps * EPOCHS
    assert logs[0][0]["selfkd/kd"] == 0 and logs[0][0]["selfkd/ce"] == pytest.approx(logs[0][0]["loss"], rel=1e-6)


@pytest.mark.parametrize("method", ["ce", "dlb", "pskd"])
def test_two_ranks_train_as_one_process_on_the_union_batch(ddp, tmp_path, method):
    got = ranks(ddp, method)
    assert all(torch.equal(got[0]["weights"][k], got[1]["weights"][k]) for k in got[0]["weights"])
    twin, seen = hf_worker.run(tmp_path, "twin", method, trainer_cls=Twin, batch=2 * BATCH)
    # the twin's step s holds exactly the rows of both ranks' step s
    assert [sorted(s) for s in seen] == [sorted(a + b) for a, b in zip(got[0]["batches"], got[1]["batches"])]
    a, b = got[0]["weights"], twin.model.state_dict()
    init = hf_worker.tiny_bert().state_dict()
    for k in a:
        # float32 sums in another order (two 5-row means averaged vs one 10-row mean, other padded widths):
        # measured against how far training moved the weights, the largest gap was 1.4e-5 (no dropout, no
        # BatchNorm, GELU: no branch flips); a wrong reduction or another sample order moves them by ~100%.
        # The absolute term covers attention's key bias, whose gradient is 0 up to rounding (moved ~1e-14)
        moved = (b[k].double() - init[k].double()).norm()
        gap = (a[k].double() - b[k].double()).norm()
        assert gap <= 1e-4 * moved + 1e-9, (method, k, float(gap), float(moved))
    if method == "pskd":  # the memory, synced at every epoch's end, is the same on both ranks and the twin's
        mem = [g["state"]["memory"] for g in got]
        assert torch.equal(mem[0], mem[1]) and (mem[0].sum(1) > 0).all()
        assert torch.allclose(mem[0], twin.method.state_dict()["memory"], atol=1e-5)


@pytest.mark.parametrize("name", ["dlb-from-3", "dlb-from-4", "pskd-from-3", "pskd-from-4", "ce-from-4"])
def test_two_rank_resume_is_bit_identical(ddp, name):
    """checkpoint-3 ends epoch 0 (the Trainer saves before on_epoch_end: PS-KD's writes not yet synced);
    checkpoint-4 is mid-epoch 1. Per-rank method state files; the resumed run equals the uninterrupted one,
    weights and every rank's method state bit for bit."""
    base, _, step = name.split("-")
    ckpt = ddp / base / f"checkpoint-{step}"
    assert not (ckpt / STATE).exists()
    assert all((ckpt / STATE.replace(".pt", f"_rank{r}.pt")).is_file() for r in (0, 1))
    full, resumed = ranks(ddp, base), ranks(ddp, name)
    for r in (0, 1):
        a, b = full[r]["weights"], resumed[r]["weights"]
        assert all(torch.equal(a[k], b[k]) for k in a), (name, r)
        assert same_state(full[r]["state"], resumed[r]["state"]), (name, r)
        assert full[r]["batches"][-len(resumed[r]["batches"]):] == resumed[r]["batches"]


def test_refusals_across_ranks(ddp, tmp_path):
    """Accelerate splitting the method's batches: refused on both ranks. A 2-rank checkpoint resumed by one
    process: one line, before any training."""
    msgs = [(ddp / "split" / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert msgs[0] == msgs[1] and "split_batches/dispatch_batches would split the method's batches" in msgs[0]
    t = SelfKDTrainer(model=hf_worker.tiny_bert(), args=hf_worker.args(tmp_path / "one"),
                      train_dataset=hf_worker.examples(), data_collator=hf_worker.pad_collator,
                      method=hf_worker.METHODS["dlb"]())
    with pytest.raises(ConfigError, match=r"holds the method state of 2 ranks, this run has 1 process; resume with "
                                          r"the same world size"):
        t.train(resume_from_checkpoint=str(ddp / "dlb" / "checkpoint-4"))
    assert t.state.global_step == 0


@pytest.mark.parametrize("name, method, accumulate", [("tok-ce", "ce", 1), ("tok-dlb", "dlb", 1), ("tok-dlb-ga2", "dlb", 2)])
def test_token_losses_on_two_ranks_with_unequal_token_counts_are_the_union_batch(ddp, tmp_path, name, method, accumulate):
    """Token classification: the ranks' batches hold unequal token counts; with the Trainer's global token count
    (average_tokens_across_devices, accumulation window included; DLB's distillation term over the repeated tokens
    of every rank) 2 ranks train as one process on the union batch. A mean per rank would weigh a token 1/(2 n_rank)."""
    got = ranks(ddp, name)
    assert all(torch.equal(got[0]["weights"][k], got[1]["weights"][k]) for k in got[0]["weights"])
    data = hf_worker.examples(kind="tok")
    tokens = [[sum(len(data[i]["labels"]) - 1 for i in step) for step in g["batches"]] for g in got]
    assert any(a != b for a, b in zip(*tokens)), tokens  # unequal per rank at some step
    twin, seen = hf_worker.run(tmp_path, "twin", method, trainer_cls=Twin, batch=2 * BATCH, kind="tok",
                               save_strategy="no", max_grad_norm=0.0, gradient_accumulation_steps=accumulate)
    assert [sorted(s) for s in seen] == [sorted(a + b) for a, b in zip(got[0]["batches"], got[1]["batches"])]
    a, b = got[0]["weights"], twin.model.state_dict()
    init = hf_worker.tiny_bert("tok").state_dict()
    for k in a:  # float32 summation order apart (see the test above); a wrong token weighting moves them by ~10%
        moved = (b[k].double() - init[k].double()).norm()
        gap = (a[k].double() - b[k].double()).norm()
        # floor: one float32 rounding of the weights themselves (a tensor that barely moves still differs by its
        # last bits across CPUs' kernels: 1.9e-9 on an AVX2 machine for a key weight that moved 7.5e-6)
        ulp = torch.finfo(torch.float32).eps * a[k].double().norm()
        assert gap <= 1e-4 * moved + ulp + 1e-9, (name, k, float(gap), float(moved))
    assert [g["sampler"] for g in got] == ["_MethodBatches", "_MethodBatches"]  # no accelerate BatchSamplerShard


@pytest.mark.parametrize("name, across", [("tok-ce", True), ("tok-ce-local", False)])
def test_the_token_count_is_the_ranks_or_the_rank_s_own_as_the_trainer_has_it(ddp, name, across):
    """num_items_in_batch, as compute_loss receives it: both ranks' tokens with average_tokens_across_devices (the
    default), each rank's own without it (the Trainer's two semantics)."""
    got = ranks(ddp, name)
    data = hf_worker.examples(kind="tok")
    tokens = [[sum(len(data[i]["labels"]) - 1 for i in step) for step in g["batches"]] for g in got]
    want = [[a + b for a, b in zip(*tokens)]] * 2 if across else tokens
    assert [g["items"] for g in got] == want
