"""zopro.seeds: every seed of a run is a pinned function of the run seed. The values below were computed by the code
before issue 12 moved the domains here (``train._seed``): a change of any of them changes every recorded run."""

import pytest

from zopro.seeds import BATCH, EVAL, PAIRS, PLACEBO, REWARD, ROLLOUT, ZO, RunSeeds, derive_seed

PINNED = [1989165263830578054, 1529855707593983007, 1142196179855387022, 3715782346887032179, 8057639509597092684,
          4238699080215063535, 15706728197929638459]  # domain d, parts (3, 4), run seed 12345


def test_domains_reproduce_the_seeds_of_runs_recorded_before_they_moved():
    seeds = RunSeeds(12345)
    assert (ROLLOUT, PAIRS, EVAL, ZO, REWARD, BATCH, PLACEBO) == tuple(range(7))
    assert [seeds.domain(d, 3, 4) for d in range(7)] == PINNED
    assert seeds.rollout(3, 4) == PINNED[ROLLOUT] and seeds.pairs(3, 4) == PINNED[PAIRS]
    assert seeds.batch(3, 4) == PINNED[BATCH]
    assert seeds.batch(1, 2, 1) == 1201358262795460505 and seeds.evaluation(0) == 18254773441643044261


def test_named_seeds_follow_their_formula():
    seeds = RunSeeds(7)
    assert seeds.zo(2) == derive_seed(derive_seed(7, ZO), 2, 1)
    assert seeds.reward(1) == derive_seed(derive_seed(7, REWARD), 1, 1)
    assert seeds.placebo(0) == derive_seed(derive_seed(7, PLACEBO), 0, 1)
    # the uses that predate the domains take the run seed itself
    assert seeds.split == seeds.tiny_base == seeds.adapters == seeds.critic == seeds.svd == 7


@pytest.mark.parametrize("seed, step, direction", [(0, 0, 0), (2**64 - 1, 5, 3), (12345, 1 << 20, 7)])
def test_derive_seed_is_64_bit(seed, step, direction):
    assert 0 <= derive_seed(seed, step, direction) < 2**64
