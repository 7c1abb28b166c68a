"""OLMo 1 / 1.7 family (model.name = "olmo"): flavors and train spec."""
from torchtitan.models.olmo.model import OlmoModelArgs, Transformer

# Sizes from allenai/OLMo configs/official (OLMo-1B, OLMo-7B, OLMo-1.7-7B). vocab_size is OLMo's
# embedding_size: the GPT-NeoX tokenizer's 50280 ids padded to 50304.
olmo_flavors: dict[str, OlmoModelArgs] = {
    # Tiny, tied like the 1B so tests exercise tying; vocab fits the bundled 2048-id tokenizer.
    "debugmodel": OlmoModelArgs(dim=256, n_layers=4, n_heads=8, ffn_hidden_dim=768, vocab_size=2048,
                                tie_word_embeddings=True),
    "1B": OlmoModelArgs(dim=2048, n_layers=16, n_heads=16, ffn_hidden_dim=8192, tie_word_embeddings=True),
    "7B": OlmoModelArgs(dim=4096, n_layers=32, n_heads=32, ffn_hidden_dim=11008),
    "1.7-7B": OlmoModelArgs(dim=4096, n_layers=32, n_heads=32, ffn_hidden_dim=11008, clip_qkv=8.0, max_seq_len=4096),
}


def get_train_spec():
    from torchtitan.models.olmo.parallelize import parallelize_olmo
    from torchtitan.models.olmo.state_dict_adapter import OlmoStateDictAdapter
    from torchtitan.protocols.train_spec import TrainSpec, default_components

    return TrainSpec(
        name="olmo",
        model_cls=Transformer,
        flavors=olmo_flavors,
        parallelize_fn=parallelize_olmo,
        state_dict_adapter=OlmoStateDictAdapter,
        **default_components(),
    )
