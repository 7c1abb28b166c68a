"""OLMo 2 family (model.name = "olmo2"): flavors and train spec."""
from torchtitan.models.olmo2.model import Olmo2ModelArgs, Transformer

# Sizes from the released OLMo 2 configs (1B 0425, 7B/13B 1124, 32B 0325). vocab_size is the
# embedding size: the dolma2 tokenizer's 100278 ids padded to 100352.
olmo2_flavors: dict[str, Olmo2ModelArgs] = {
    # Tiny, with grouped KV heads like the 32B so tests cover GQA under the QK-norm; vocab fits the
    # bundled 2048-id tokenizer.
    "debugmodel": Olmo2ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden_dim=768, vocab_size=2048),
    "1B": Olmo2ModelArgs(dim=2048, n_layers=16, n_heads=16, ffn_hidden_dim=8192),
    "7B": Olmo2ModelArgs(dim=4096, n_layers=32, n_heads=32, ffn_hidden_dim=11008),
    "13B": Olmo2ModelArgs(dim=5120, n_layers=40, n_heads=40, ffn_hidden_dim=13824),
    "32B": Olmo2ModelArgs(dim=5120, n_layers=64, n_heads=40, n_kv_heads=8, ffn_hidden_dim=27648),
}


def get_train_spec():
    from torchtitan.models.olmo2.parallelize import parallelize_olmo2
    from torchtitan.models.olmo2.state_dict_adapter import Olmo2StateDictAdapter
    from torchtitan.protocols.train_spec import TrainSpec, default_components

    return TrainSpec(
        name="olmo2",
        model_cls=Transformer,
        flavors=olmo2_flavors,
        parallelize_fn=parallelize_olmo2,
        state_dict_adapter=Olmo2StateDictAdapter,
        **default_components(),
    )
