from sonosynth.trainers.worker import example_indices, noise_seed


def order(n, world, micro_batch, grad_accum, steps, rank, seed=0):
    return [i for step in range(steps) for micro in range(grad_accum)
            for i in example_indices(n, seed, step=step, micro=micro, rank=rank, world=world,
                                     micro_batch=micro_batch, grad_accum=grad_accum)]


def test_each_epoch_visits_every_example_once_across_ranks():
    n, world, mb, ga = 12, 2, 2, 3  # global batch 12 = one epoch per step
    for step in range(3):
        seen = [i for rank in range(world) for micro in range(ga)
                for i in example_indices(n, 7, step=step, micro=micro, rank=rank, world=world,
                                         micro_batch=mb, grad_accum=ga)]
        assert sorted(seen) == list(range(n))


def test_order_is_a_pure_function_of_seed_and_step():
    assert order(10, 2, 1, 1, 20, 0) == order(10, 2, 1, 1, 20, 0)
    assert order(10, 2, 1, 1, 20, 0) != order(10, 2, 1, 1, 20, 0, seed=1)
    later = [example_indices(10, 0, step=s, micro=0, rank=1, world=2, micro_batch=1, grad_accum=1)[0]
             for s in range(5, 20)]
    assert later == order(10, 2, 1, 1, 20, 1)[5:]


def test_epochs_are_reshuffled():
    first, second = order(8, 1, 8, 1, 2, 0)[:8], order(8, 1, 8, 1, 2, 0)[8:]
    assert sorted(first) == sorted(second) == list(range(8)) and first != second


def test_noise_seeds_differ_per_rank_step_and_micro():
    seeds = {noise_seed(0, s, m, r) for s in range(10) for m in range(2) for r in range(2)}
    assert len(seeds) == 40
