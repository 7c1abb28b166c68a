"""Llama 3 family: flavors and train spec."""
from torchtitan.models.common.rope import RopeScaling
from torchtitan.models.llama3.model import LlamaModelArgs, Transformer

_LLAMA_3_1 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA_3_2 = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

llama3_flavors: dict[str, LlamaModelArgs] = {
    # Small enough to learn visibly in about a minute on 2 CPU cores; vocab fits the bundled tokenizer.
    "debugmodel": LlamaModelArgs(dim=256, n_layers=6, n_heads=16, n_kv_heads=8, vocab_size=2048, rope_theta=500000),
    "1B": LlamaModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256,
                         rope_theta=500000, rope_scaling=_LLAMA_3_2, tie_word_embeddings=False),
    "3B": LlamaModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0, multiple_of=256,
                         rope_theta=500000, rope_scaling=_LLAMA_3_2),
    "8B": LlamaModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024,
                         rope_theta=500000, rope_scaling=_LLAMA_3_1),
    # The 8B layer shape with 8 layers: the single-GPU benchmark shape of shared/bench.
    "8B_8L": LlamaModelArgs(dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024,
                            rope_theta=500000),
    "70B": LlamaModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096,
                          rope_theta=500000, rope_scaling=_LLAMA_3_1),
    "405B": LlamaModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2, multiple_of=4096,
                           rope_theta=500000, rope_scaling=_LLAMA_3_1),
}


def get_train_spec():
    from torchtitan.models.llama3.parallelize import parallelize_llama
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter
    from torchtitan.protocols.train_spec import TrainSpec, default_components

    return TrainSpec(
        name="llama3",
        model_cls=Transformer,
        flavors=llama3_flavors,
        parallelize_fn=parallelize_llama,
        state_dict_adapter=Llama3StateDictAdapter,
        **default_components(),
    )
