"""torchtitan 0.2.2's own trainer, with the two Llama 3 shapes it does not ship added to its flavor table.

8B_8L: the Llama 3 8B layer shape, 8 layers (our llama3 8B_8L flavor); 1B: Llama 3.2 1B's shape (our 1B).
Run from this folder with torchtitan 0.2.2 (not ours) first on the path: run.sh sets that up.
"""
import torchtitan.models.llama3 as tt_llama3
from torchtitan.models.llama3.model.args import TransformerModelArgs

SHAPES = {
    "8B_8L": dict(dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024),
    "1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256),
}
for name, shape in SHAPES.items():
    tt_llama3.llama3_args[name] = TransformerModelArgs(rope_theta=500000, **shape)

from torchtitan.train import Trainer, main  # noqa: E402  (after the flavors exist)

main(Trainer)
