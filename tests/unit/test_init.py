"""Random weights: one seed, the same weights on whatever device they are made."""

import torch

from memory3.model.checkpoint import weights_digest
from memory3.model.init import init_weights, random_model
from memory3.model.model import Transformer


def test_a_random_model_made_off_the_cpu_gets_the_weights_of_one_initialised_there(tiny_config):
    """Made on the meta device and drawn into a parameter at a time, every parameter is drawn (none is
    left as `to_empty` leaves it), as it is into a model built and initialised by torch first."""
    torch.manual_seed(1)  # torch's own initialisation, which the seeded draw overwrites
    built = init_weights(Transformer(tiny_config), seed=3)
    made = random_model(tiny_config, seed=3)
    assert weights_digest(made) == weights_digest(built)
    assert weights_digest(random_model(tiny_config, seed=4)) != weights_digest(made)
    tokens, positions = torch.randint(0, tiny_config.vocab_size, (1, 20)), torch.arange(20)[None]
    with torch.no_grad():
        torch.testing.assert_close(made(tokens, positions), built(tokens, positions), rtol=0, atol=0)
    assert made.rope.inv_freq.device.type == "cpu" and not made.training
