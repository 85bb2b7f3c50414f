"""The 1-process twin's sample order for 2-rank equivalence tests."""
from torch.utils.data import DistributedSampler, Sampler


class UnionSampler(Sampler[int]):
    """One process's order whose step ``s`` (batch ``world * b``) is rank 0's step-``s`` samples, then rank
    1's, ..., as the ranks' ``DistributedSampler`` s seeded with ``seed`` draw them."""

    def __init__(self, n: int, seed: int, b: int, world: int = 2):
        self.shards = [DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=seed)
                       for r in range(world)]
        self.b = b

    def set_epoch(self, epoch: int) -> None:
        for s in self.shards:
            s.set_epoch(epoch)

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def __iter__(self):
        parts = [list(s) for s in self.shards]
        for k in range(0, len(parts[0]), self.b):
            for p in parts:
                yield from p[k : k + self.b]
