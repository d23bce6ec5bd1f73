"""The GRPO experiment's pieces (experiments/rl): the trainer's differentiable model gives
the log-probabilities Loong reports for the same sampled tokens (raw logprobs, fp32), its
named trainable tensors are what `update_weights` takes, and the reward parses answers."""
import torch

from loong import LLM, SamplingParams
from loong.model.loader import load_model_files
from tests.experiment_loader import load_experiment


def test_trainer_model_logprobs_equal_loongs_and_its_updates_load(tiny_path):
    pm = load_experiment("rl/policy_model")
    loaded = load_model_files(tiny_path)
    model = pm.TrainLlama(loaded)
    llm = LLM(tiny_path, loaded=loaded, dtype="float32")
    prompt = [5 + (3 * j) % 200 for j in range(17)]
    out = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=4,
                                              logprobs=0, ignore_eos=True))[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        got = model.token_logprobs(ids, [len(prompt)], [len(out.token_ids)])[0]
    want = torch.tensor([lp for lp, _ in out.logprobs])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Train two layers, change them, push them: Loong then agrees with the changed model.
    model.trainable(1)
    names = [n for n, _ in model.named_trainable()]
    assert names and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in names)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.1)
    llm.update_weights(model.named_trainable())
    out2 = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=4,
                                               logprobs=0, ignore_eos=True))[0]
    with torch.no_grad():
        got2 = model.token_logprobs(torch.tensor([prompt + out2.token_ids]), [len(prompt)],
                                    [len(out2.token_ids)])[0]
    torch.testing.assert_close(got2, torch.tensor([lp for lp, _ in out2.logprobs]),
                               atol=1e-4, rtol=1e-4)


def test_reward_reads_the_first_number():
    grpo = load_experiment("rl/grpo")
    assert grpo.reward(" 8.", 3, 5) == 1.0
    assert grpo.reward(" 3 + 5 = 8", 3, 5) == 0.0
    assert grpo.reward(" eight", 3, 5) == 0.0
