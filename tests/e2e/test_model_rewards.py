"""Rewards no rule can check drive a tiny run the way they prefer: a reward model trained here on a toy preference
(even final answers), and a generative judge served by an engine a plugin registers (rewards.judge)."""

import json
import random

import pytest
import torch
from conftest import run_r1

from r1cli.run.metrics import read_metrics

EVEN = '''
import re

from r1cli.rewards import reward


@reward("even_answer")
def even_answer(completion, row, ctx):
    m = re.search(r"<answer>\\s*(-?\\d+)\\s*</answer>", ctx.full(completion))
    return float(m is not None and int(m.group(1)) % 2 == 0)
'''

JUDGE_ENGINE = '''
import re

from r1cli.interfaces import ENGINES, Completion, engine_factory
from r1cli.models.loading import load_tokenizer


class ParityJudge:
    """Says yes to an even final answer: stands in for a judge model, through the engine registry."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def generate(self, prompts, params):
        out = []
        for ids in prompts:
            m = re.search(r"Final answer: (-?\\d+)", self.tok.decode(ids))
            out.append([Completion(list(ids), [], "yes" if m and int(m.group(1)) % 2 == 0 else "no", "stop")])
        return out

    def load_weights(self, weights):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass


@engine_factory(reports_logprobs=False)
def parity_judge(model, rollout, trainer=None):
    return ParityJudge(load_tokenizer(model.path))


ENGINES.register("parity_judge", parity_judge)
'''


def train_even_reward_model(base, out, steps=60, seed=0):
    """A sequence-classification model on the tiny model's shape, trained (Bradley-Terry) to prefer even answers."""
    from transformers import AutoModelForSequenceClassification

    from r1cli.models.loading import load_tokenizer
    from r1cli.rewards.model_rewards import _conversation

    torch.manual_seed(seed)
    tok = load_tokenizer(str(base))
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1, local_files_only=True)
    model.config.pad_token_id = tok.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    r = random.Random(seed)

    def sample(even):
        a, b = r.randint(10, 99), r.randint(10, 99)
        n = r.randrange(20, 200, 2) + (0 if even else 1)
        return f"{a}+{b}=?", f"<think>{a % 10}+{b % 10}={(a + b) % 10}</think><answer>{n}</answer>"

    for _ in range(steps):
        seqs = [_conversation(tok, q, resp, 256) for _ in range(32) for q, resp in (sample(True), sample(False))]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        att = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], att[i, : len(s)] = torch.tensor(s), 1
        score = model(input_ids=ids, attention_mask=att).logits[:, 0].view(-1, 2)
        loss = -torch.nn.functional.logsigmoid(score[:, 0] - score[:, 1]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _task(folder):
    folder.mkdir()
    (folder / "even.py").write_text(EVEN)
    (folder / "judge_engine.py").write_text(JUDGE_ENGINE)
    (folder / "judge.txt").write_text("Question: {question}\\nFinal answer: {answer}\\nIs it right? yes or no:")
    r = random.Random(0)
    rows = [{"question": f"{r.randint(10, 99)}+{r.randint(10, 99)}=?"} for _ in range(400)]
    (folder / "questions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def _run(cold_start, task, out, *extra):
    proc = run_r1("rl", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
                  f"data.train={task / 'questions.jsonl'}", "data.eval=", "data.prompt_field=question",
                  "train.steps=16", "logging.progress=false", "logging.tensorboard=false",
                  "checkpoint.export_hf=false", "logging.sample_every=0", f"train.output_dir={out}", *extra,
                  env={"OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [m["reward/even_answer"] for m in read_metrics(out / "metrics.jsonl") if "reward/even_answer" in m]


def _gain(curve):
    return sum(curve[-4:]) / 4 - sum(curve[:4]) / 4


# the judge's learning run is opt-in: the default run has the judge grading r1 sample and r1 eval
@pytest.mark.slow  # opt-in since the default run passed 15 minutes; r1 eval and r1 sample with the judge stay
@pytest.mark.parametrize("reward", ["reward_model", pytest.param("judge", marks=pytest.mark.slow)])
def test_a_reward_model_and_a_judge_drive_the_run_the_way_they_prefer(cold_start, tiny_model, tmp_path, reward):
    task = _task(tmp_path / "task")
    if reward == "reward_model":
        rm = train_even_reward_model(tiny_model, tmp_path / "rm")
        # the preference is only watched (weight 0), the reward model alone is trained on
        by_model = _run(cold_start, task, tmp_path / "rm_run", f"plugins=[{task / 'even.py'}]",
                        "rewards.weights={reward_model: 1.0, even_answer: 0.0}", f"rewards.model.path={rm}",
                        "rewards.model.normalize=sigmoid")
        assert _gain(by_model) >= 0.25, by_model
        return
    by_judge = _run(cold_start, task, tmp_path / "judge_run",
                    f"plugins=[{task / 'even.py'}, {task / 'judge_engine.py'}]",
                    "rewards.weights={judge: 1.0, even_answer: 0.0}", f"rewards.judge.path={tiny_model}",
                    "rewards.judge.engine=parity_judge", f"rewards.judge.template={task / 'judge.txt'}")
    assert _gain(by_judge) >= 0.25, by_judge


def test_a_model_reward_without_its_model_is_one_line():
    import pytest

    from r1cli.config import load_config
    from r1cli.errors import R1Error

    with pytest.raises(R1Error, match="rewards.weights.reward_model needs rewards.model.path"):
        load_config(None, ["rewards.weights={reward_model: 1.0}"])
    with pytest.raises(R1Error, match="rewards.weights.judge needs rewards.judge.path"):
        load_config(None, ["rewards.weights={judge: 1.0}"])


def test_judge_replies_parse_as_verdicts_or_scores():
    from r1cli.config import JudgeRewardConfig
    from r1cli.rewards.model_rewards import Judge

    judge = Judge.__new__(Judge)
    judge.cfg = JudgeRewardConfig(verdict="score", max_score=10)
    assert [judge.parse(t) for t in ("7/10", "Score: 12", "none", "-3")] == [0.7, 1.0, 0.0, 0.0]
    judge.cfg = JudgeRewardConfig(verdict="yes_no")
    assert [judge.parse(t) for t in ("Yes.", "no", "yes, but", "maybe yes")] == [1.0, 0.0, 1.0, 0.0]


def test_the_judge_asks_once_per_prompt_and_response(tiny_model):
    from r1cli.config import DataConfig, JudgeRewardConfig
    from r1cli.interfaces import Completion
    from r1cli.models.loading import load_tokenizer
    from r1cli.rewards.model_rewards import JUDGE_TEMPLATE, Judge

    asked = []

    class Engine:
        def generate(self, prompts, params):
            asked.append(len(prompts))
            return [[Completion(p, [], "yes", "stop")] for p in prompts]

    judge = Judge.__new__(Judge)
    judge.cfg, judge.template, judge.engine = JudgeRewardConfig(), JUDGE_TEMPLATE, Engine()
    judge.tokenizer, judge.data, judge.cache = load_tokenizer(str(tiny_model)), DataConfig(template="plain"), {}
    assert judge(["q", "q", "q"], ["a", "a", "b"], ["", "", ""]) == [1.0, 1.0, 1.0] and asked == [2]
    assert judge(["q", "q2"], ["b", "a"], ["", ""]) == [1.0, 1.0] and asked == [2, 1]


def test_r1_sample_verifies_rows_without_answers_with_the_rl_judge(cold_start, tiny_model, tmp_path):
    import re

    task = _task(tmp_path / "task")
    out = tmp_path / "kept.jsonl"
    proc = run_r1("sample", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
                  f"data.train={task / 'questions.jsonl'}", "data.prompt_field=question", "data.max_samples=16",
                  "rollout.n=4", f"sample.out={out}", f"plugins=[{task / 'judge_engine.py'}]",
                  f"rewards.judge.path={tiny_model}", "rewards.judge.engine=parity_judge",
                  f"rewards.judge.template={task / 'judge.txt'}", env={"OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    answers = [re.search(r"<answer>\s*(-?\d+)", r["response"]) for r in rows]
    assert rows and all(a is not None and int(a.group(1)) % 2 == 0 for a in answers)


def test_r1_eval_grades_open_questions_with_the_judge(cold_start, tiny_model, tmp_path):
    import re

    task = _task(tmp_path / "task")
    rows = [{"prompt": json.loads(line)["question"]} for line in (task / "questions.jsonl").read_text().splitlines()]
    (task / "open.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:12]))
    out = tmp_path / "eval"
    proc = run_r1("eval", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
                  f"benchmark.benchmarks=[judged={task / 'open.jsonl'}]", f"benchmark.out={out}",
                  "benchmark.samples=2", "benchmark.max_new_tokens=48", f"plugins=[{task / 'judge_engine.py'}]",
                  f"rewards.judge.path={tiny_model}", "rewards.judge.engine=parity_judge",
                  f"rewards.judge.template={task / 'judge.txt'}", env={"OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24
    for s in samples:
        m = re.search(r"<answer>\s*(-?\d+)", s["completion"])
        assert s["correct"] == bool(m and int(m.group(1)) % 2 == 0) and s["reason"].startswith("judged")
    no_judge = run_r1("eval", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
                      f"benchmark.benchmarks=[judged={task / 'open.jsonl'}]", f"benchmark.out={tmp_path / 'e2'}")
    assert no_judge.returncode == 2 and "the judged benchmark needs a judge: rewards.judge.path" in no_judge.stderr


def test_reward_settings_for_a_reward_the_run_does_not_use_are_refused(monkeypatch, tmp_path):
    import pytest

    from r1cli.config import load_config
    from r1cli.errors import R1Error

    with pytest.raises(R1Error, match="rewards.model is read only by the reward_model reward"):
        load_config(None, [f"rewards.model.path={tmp_path}"])
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["rewards.weights={reward_model: 1.0}", "rewards.model.path=~/rm"])
    assert cfg.rewards.model.path == str(tmp_path / "rm")  # expanded like every other path
