"""train/sft.py: LoRA and full fine-tuning runs end to end (from a Hugging Face directory, then from a DCP run
directory), the frozen base, the PEFT adapter and merged export, the best checkpoint and validation loss, clear
tokenizer errors; the cached greedy decoder and the validation loss against direct computations."""

import json

import pytest
import torch

from latentforge.model import HybridModel, ModelConfig
from latentforge.model.hf import save_pretrained
from latentforge.train.callbacks.jsonl import read_jsonl
from latentforge.train.lora import lora_parameters
from latentforge.train.lora.checkpoint import load_model
from latentforge.train.lora import LoRAConfig
from latentforge.train.sft import (
    SFTConfig,
    SFTConfigError,
    SFTSetup,
    greedy_completions,
    load_configs,
    rewrite_overrides,
    run,
    validation_loss,
)

WORDS = (
    "What is 12 + 3 * 4? First the multiplication: 3 * 4 = 12. Then 12 + 12 = 24. Answer: 24. "
    "Ada has 5 apples and buys 3 bags with 4 apples in each bag. How many apples does Ada have now? "
)


def small_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(
        pattern="M*E",
        hidden_size=32,
        vocab_size=vocab_size,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        mamba_num_heads=4,
        mamba_head_dim=8,
        mamba_groups=1,
        ssm_state_size=8,
        chunk_size=16,
        num_experts=4,
        top_k=2,
        moe_intermediate_size=16,
        moe_latent_size=16,
        shared_expert_intermediate_size=32,
        mtp_depths=1,
    )


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A Hugging Face starting directory: a small model with its own small BPE tokenizer.json."""
    from latentforge.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("sft")
    tokenizer = train_bpe([WORDS * 20], 320, str(root / "bpe" / "tokenizer.json"))
    torch.manual_seed(0)
    model = HybridModel(small_config(tokenizer.vocab_size))
    save_pretrained(model, root / "start")
    (root / "start" / "tokenizer.json").write_bytes((root / "bpe" / "tokenizer.json").read_bytes())
    return root


def common(root, run_name):
    return [
        f"train.run_dir={root / run_name}",
        "train.steps=4",
        "train.seq_len=64",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.log_interval=1",
        "train.checkpoint_interval=2",
        "train.progress_bar=false",
        "train.wandb.enabled=false",
        "optim.warmup_steps=1",
        "data.synthetic_num_train=48",
        "data.synthetic_num_heldout=8",
        f"data.cache_dir={root / 'cache'}",
        "sft.eval_interval=2",
        "sft.eval_batches=1",
        "sft.accuracy_problems=2",
        "sft.max_new_tokens=6",
    ]


def test_lora_run_then_full_sft_from_its_checkpoint(start, capsys):
    root = start
    assert run(["recipe=lora_tiny", f"sft.init_from={root / 'start'}", "lora.rank=4", *common(root, "lora")]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy before fine-tuning: " in out and "after fine-tuning" in out
    lora_dir = root / "lora"

    # validation loss at step 0 (the start), 2 and 4, logged with the step metrics; the best model kept
    val = {r["step"]: r["val_loss"] for r in read_jsonl(str(lora_dir / "metrics.jsonl")) if "val_loss" in r}
    assert sorted(val) == [2, 4]
    best = json.loads(next((lora_dir / "best").glob("step_*/validation.json")).read_text())
    assert best["val_loss"] <= min(val.values())
    assert (lora_dir / "best" / "adapter" / "adapter_model.safetensors").is_file()

    # the base stayed frozen (its MoE routing bias too): the final checkpoint's base is the start, adapters moved
    trained, lora_cfg = load_model(str(lora_dir))
    assert lora_cfg.rank == 4
    starting, _ = load_model(str(root / "start"))
    base = {k: v for k, v in trained.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(v, starting.state_dict()[k]) for k, v in base.items())
    assert any(p.abs().sum() > 0 for n, p in lora_parameters(trained).items() if n.endswith("lora_B"))

    # the PEFT directory equals the checkpoint's adapters; the merged export equals the adapted model
    from_peft, _ = load_model(str(root / "start"), adapter=str(lora_dir / "adapter"))
    ids = torch.randint(0, trained.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        adapted = trained(ids).logits
        torch.testing.assert_close(from_peft(ids).logits, adapted, rtol=0, atol=0)
        merged, none = load_model(str(lora_dir / "hf"))
        assert none is None
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-5)
    assert json.loads((lora_dir / "accuracy.json").read_text())["after"][1] == 2
    # exporting the LoRA run never drops its adapters: train.export merges them, model.hf refuses
    from latentforge.model import hf
    from latentforge.train.export import main as export_cli

    assert export_cli([str(lora_dir), str(root / "exported")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(hf.load_pretrained(root / "exported")(ids).logits, adapted, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="LoRA checkpoint"):
        hf.export_dcp_checkpoint(lora_dir, root / "refused")
    from latentforge.train.export import load_model_from_checkpoint  # what rl.init_from and rl/generate.py load

    with torch.no_grad():
        torch.testing.assert_close(load_model_from_checkpoint(str(lora_dir))(ids).logits, adapted, rtol=1e-4, atol=1e-5)
    assert not (root / "refused").exists()
    # the command line extracts the same adapter from the best checkpoint's folder
    from latentforge.train.lora.__main__ import main as lora_cli

    assert lora_cli(["save-adapter", str(lora_dir / "best"), str(root / "extracted")]) == 0
    assert (root / "extracted" / "adapter_model.safetensors").read_bytes() == (
        lora_dir / "best" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()

    # full fine-tuning from the LoRA run's DCP directory: everything trains, adapters are not part of it
    assert (
        run(
            [
                "recipe=sft_tiny",
                f"sft.init_from={lora_dir}",
                "train.export_hf=false",
                *common(root, "full")[:-2],
                "sft.accuracy_problems=0",
            ]
        )
        == 0
    )
    full, cfg = load_model(str(root / "full"))
    assert cfg is None
    assert not torch.equal(
        full.state_dict()["backbone.layers.1.mixer.q_proj.weight"],
        trained.state_dict()["backbone.layers.1.mixer.q_proj.weight"],
    )


def test_starting_checkpoint_problems_are_clear_errors(start, tmp_path):
    from latentforge.data.tokenizer import TokenizerMismatchError, train_bpe

    with pytest.raises(SFTConfigError, match="does not exist"):
        run(["recipe=sft_tiny", f"sft.init_from={tmp_path / 'nowhere'}", *common(tmp_path, "x")])
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((start / "start" / name).read_bytes())
    with pytest.raises(TokenizerMismatchError, match="no tokenizer.json"):
        run(["recipe=sft_tiny", f"sft.init_from={no_tokenizer}", *common(tmp_path, "x")])
    other = train_bpe(["completely different text " * 50], 300, str(tmp_path / "other" / "tokenizer.json"))
    with pytest.raises(TokenizerMismatchError, match="not the tokenizer of the starting checkpoint"):
        run(
            [
                "recipe=sft_tiny",
                f"sft.init_from={start / 'start'}",
                "data.tokenizer.kind=hf",
                f"data.tokenizer.path={other.path}",
                *common(tmp_path, "x"),
            ]
        )
    with pytest.raises(SFTConfigError, match="data.kind"):
        run(["recipe=sft_tiny", f"sft.init_from={start / 'start'}", "data.kind=pretrain", *common(tmp_path, "x")])


def test_data_path_is_one_file():
    assert rewrite_overrides(["data.path=my.jsonl", "train.steps=3"]) == ["data.paths=[my.jsonl]", "train.steps=3"]
    assert rewrite_overrides(["+data.path=[a.jsonl,b.jsonl]"]) == ["data.paths=[a.jsonl,b.jsonl]"]


def test_load_configs_returns_the_typed_setup():
    full = load_configs(["recipe=sft_tiny", "sft.eval_batches=3", "data.path=chats.jsonl"])
    assert isinstance(full, SFTSetup) and isinstance(full.sft, SFTConfig) and full.lora is None
    assert full.sft.eval_batches == 3 and full.data.paths == ["chats.jsonl"] and full.recipe.sft.eval_batches == 3
    adapters = load_configs(["recipe=lora_tiny", "lora.rank=4"])
    assert isinstance(adapters.lora, LoRAConfig) and adapters.lora.rank == 4
    with pytest.raises(SFTConfigError, match="data.kind"):
        load_configs(["recipe=sft_tiny", "data.kind=pretrain"])


def test_cached_greedy_decoding_matches_recomputation():
    torch.manual_seed(1)
    model = HybridModel(small_config(64)).eval()
    prompts = [[5, 9, 3, 17, 2, 8, 40], [7, 7, 1]]  # different lengths share one batched cache
    got = greedy_completions(model, prompts, 6, stop_ids=set())
    for prompt, completion in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert completion == ids[len(prompt) :]


def test_validation_loss_is_the_token_weighted_mean():
    from latentforge.train.parallel import ParallelConfig, build_runner

    torch.manual_seed(2)
    model = HybridModel(small_config(64))
    batches = []
    for seed in (3, 4):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 64, (2, 16), generator=g)
        labels = torch.where(torch.rand(2, 16, generator=g) < 0.5, ids.roll(-1, 1), -100)
        batches.append({"input_ids": ids, "labels": labels, "seq_idx": torch.zeros(2, 16, dtype=torch.int32)})
    with torch.no_grad():
        total = sum(
            torch.nn.functional.cross_entropy(
                model(b["input_ids"]).logits.flatten(0, 1), b["labels"].flatten(), reduction="sum"
            )
            for b in batches
        )
        expected = total / sum(int((b["labels"] != -100).sum()) for b in batches)
    runner = build_runner(model, model.cfg, ParallelConfig())
    # forward only: no backward, and the gradients accumulated so far (mid-step) stay as they are
    runner.forward_backward = lambda *a, **k: pytest.fail("validation ran a backward")
    grads = {}
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, 0.5)
        grads[name] = p.grad.clone()
    model.train()
    assert validation_loss(runner, batches, torch.device("cpu")) == pytest.approx(float(expected), rel=1e-5)
    assert model.training  # back in the mode it was in
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())


def test_only_adapters_train_after_parallelisation_and_every_stage_has_some():
    from latentforge.train.lora import LoRAConfig, apply_lora
    from latentforge.train.sft import check_only_adapters_train

    torch.manual_seed(0)
    model = HybridModel(small_config(64))
    apply_lora(model, LoRAConfig(rank=2, alpha=2, targets=["q_proj"]))
    check_only_adapters_train([model])
    model.backbone.layers[2].mixer.experts.up_proj.requires_grad_(True)  # as a layer that rebuilt it would
    with pytest.raises(RuntimeError, match="experts.up_proj"):
        check_only_adapters_train([model])
    model.backbone.layers[2].mixer.experts.up_proj.requires_grad_(False)
    stage = HybridModel(small_config(64))  # a pipeline stage without any adapter
    stage.requires_grad_(False)
    with pytest.raises(SFTConfigError, match="stage 1 .* holds no adapted module"):
        check_only_adapters_train([stage], [1])
