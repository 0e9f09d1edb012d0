"""The shared retrieval and classification metrics (sdk.train.metrics)."""

import numpy as np
import pytest

from sdk.train.metrics import recall_at_k, weighted_f1


def test_recall_at_k_counts_the_first_k_and_relevance_by_key():
    e = np.eye(4, dtype=np.float32)
    q = np.stack([e[1], e[0], e[2], e[3]])
    assert recall_at_k(q, e, np.arange(4), np.arange(4), ks=(1, 2)) == {"R@1": 0.5, "R@2": 1.0}
    # relevance by key: query 0 finds item 1, which shares its key
    assert recall_at_k(q, e, np.array([0, 0, 2, 3]), np.array([0, 0, 2, 3]), ks=(1,))["R@1"] == 1.0


def test_recall_at_10_of_a_query_ranked_last():
    g = np.eye(12, dtype=np.float32)
    keys = np.arange(12)
    assert recall_at_k(g, g, keys, keys, ks=(10,)) == {"R@10": 1.0}
    assert recall_at_k(-g, g, keys, keys, ks=(10,)) == {"R@10": 0.0}  # each query's own item ranks last of 12


def test_recall_reads_torch_tensors_and_small_galleries():
    torch = pytest.importorskip("torch")
    g = torch.eye(12)
    q = g.clone()
    q[0] = g[1]  # query 0 finds product 1 first, which shares its title
    keys = np.array([0, 0, *range(1, 11)])
    assert recall_at_k(q, g, keys, keys) == {"R@1": 1.0, "R@10": 1.0}
    keys[1] = 99  # now it does not
    assert recall_at_k(q, g, keys, keys) == {"R@1": round(11 / 12, 4), "R@10": 1.0}
    assert recall_at_k(q[:3], g[:3], keys[:3], keys[:3], ks=(1, 10))["R@10"] == 1.0  # k beyond the gallery


def test_weighted_f1():
    y = np.array(["a", "a", "b", "c"])
    assert weighted_f1(y, y) == 1.0
    # a: P=1 R=.5 F=2/3 (w .5); b: P=.5 R=1 F=2/3 (w .25); c: 1 (w .25)
    assert weighted_f1(y, np.array(["a", "b", "b", "c"])) == pytest.approx(0.5 * 2 / 3 + 0.25 * 2 / 3 + 0.25, abs=1e-4)


def test_top1_misses_counts_the_misses_a_title_cannot_tell_apart():
    from sdk.train.catalog import title_words
    from sdk.train.metrics import top1_misses

    titles = ["Men Check Blue Shirt", "Men Blue Check Shirts", "Women Red Heels", "Women Black Heels"]
    words = [title_words(t) for t in titles]
    assert words[0] == words[1] == ("blue", "check", "men", "shirt") and words[2] != words[3]
    g = np.eye(4, dtype=np.float32)
    q = g[[1, 0, 3, 3]]  # 0 and 1 swap (same words), 2 finds 3 (other words), 3 finds itself
    keys = np.arange(4)
    assert top1_misses(q, g, keys, words) == {"first-hit misses": 3, "first-hit misses, same words": 2}
    assert top1_misses(g, g, keys, words) == {"first-hit misses": 0, "first-hit misses, same words": 0}
