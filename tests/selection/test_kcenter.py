"""selection.kcenter: k-center greedy on a known 1-D layout."""
import torch

from raycompress.selection.kcenter import k_center_greedy


def test_farthest_first_known_order():
    pts = torch.tensor([[0.0], [1.0], [10.0], [4.0], [6.0]])
    # start at 0 -> farthest is 10 (idx 2) -> then 4 vs 6: min dists 4 and 4 -> lowest index (3)
    assert k_center_greedy(pts, 3) == [0, 2, 3]
    assert k_center_greedy(pts, 9) == [0, 1, 2, 3, 4]
