"""What a model family plugs into the trainer: its flavors and its checkpoint adapter.

The model itself is always the one decoder (models/common/decoder.py) built from
the flavor's args, and parallelized by the one decoder sequence
(models/common/parallelize.py); the args say what differs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from torchtitan.models.common.adapter import StateDictAdapter
from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.decoder import Decoder
from torchtitan.tools.errors import ConfigError


@dataclass(frozen=True)
class TrainSpec:
    name: str
    flavors: dict[str, DecoderArgs]
    state_dict_adapter: type[StateDictAdapter]

    def model_args(self, flavor: str) -> DecoderArgs:
        """A copy of the flavor's args (callers may change run settings such as max_seq_len)."""
        if flavor not in self.flavors:
            raise ConfigError(f"model.flavor {flavor!r} is not a {self.name} flavor; valid: {', '.join(self.flavors)}")
        return dataclasses.replace(self.flavors[flavor])

    def build_model(self, args: DecoderArgs) -> Decoder:
        return Decoder(args)

    def build_meta_model(self, args: DecoderArgs) -> Decoder:
        """On the meta device: no memory until parallelisms decide what each rank holds (then to_empty and
        init_weights, or a checkpoint load)."""
        with torch.device("meta"):
            return Decoder(args)

    def adapter(self, args: DecoderArgs) -> StateDictAdapter:
        return self.state_dict_adapter(args)

    def matching_flavor(self, args: DecoderArgs) -> str | None:
        """The flavor computing the same function as `args` (what model.flavor to train or generate with)."""
        want = args.architecture()
        return next((name for name, fl in self.flavors.items() if fl.architecture() == want), None)

    def args_class(self) -> type[DecoderArgs]:
        return type(next(iter(self.flavors.values())))
