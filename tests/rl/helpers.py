"""Small models and configs shared by the GRPO tests."""

from latentforge.model.config import ModelConfig
from latentforge.model.recipes import compose, model_config_from


def micro_model_cfg(vocab_size: int = 128, **overrides) -> ModelConfig:
    """Every layer kind the engine must handle (Mamba, attention, MoE) and MTP, at toy width; `overrides` are
    ModelConfig fields. Returns the typed config `rl/` receives in production, built by the same checking from_dict."""
    tiny = model_config_from(compose(["recipe=tiny"])).to_dict()
    micro = dict(
        pattern="M*E",
        hidden_size=32,
        vocab_size=vocab_size,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        mamba_num_heads=4,
        mamba_head_dim=16,
        mamba_groups=1,
        ssm_state_size=8,
        chunk_size=16,
        num_experts=4,
        top_k=2,
        moe_intermediate_size=16,
        moe_latent_size=16,
        shared_expert_intermediate_size=32,
        mlp_intermediate_size=32,
        mtp_depths=2,
    )
    return ModelConfig.from_dict({**tiny, **micro, **overrides})
