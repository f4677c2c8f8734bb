"""A node of the window-safe radix cache, and the window walk over its pages.

A node holds a run of whole pages: its key is one `PageKey` per page (the page's tokens plus
the optional extra mixed into its block hash), and per page a full-attention page id, an SWA page
id or None (a tombstone), the page's block hash, and two SWA guard counters:

- `tail_refs[i]`: how many retention points have page i inside their SWA tail;
- `swa_locks[i]`: how many locks have page i inside the window of their lock point.

The window of a point P (a node end) is the set of pages overlapping [P - window, P):

    positions   ... | p-3 | p-2 | p-1 |  P          window = 2.5 pages
                        [----- window ----)
                      ^ P - window falls inside page p-3, which is therefore in the window

It may reach up through ancestors; `window_pages` walks it from P backwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from services.common.block_hash import ROOT_HASH, BlockHash
from services.common.kv_events import BlockStored, KVKind

PageKey = tuple[tuple[int, ...], bytes | None]
"""One page of a radix key: its token ids and the extra mixed into its hash (None if none)."""

# SWA page classes, in the order evict_swa takes them; LOCKED pages are never taken.
DEEP, TAIL, LOCKED = 0, 1, 2


class RadixNode:
    """Pages [start, end) of every sequence that passes through this node (token positions)."""

    __slots__ = (
        "uid",
        "parent",
        "children",
        "start",
        "end",
        "page_keys",
        "full_pages",
        "swa_pages",
        "hashes",
        "tail_refs",
        "swa_locks",
        "swa_class_count",
        "lock_ref",
        "last_access",
        "retain",
        "point_applied",
        "detached",
    )

    def __init__(
        self,
        uid: int,
        parent: RadixNode | None,
        start: int,
        end: int,
        page_keys: list[PageKey],
        full_pages: list[int],
        swa_pages: list[int | None],
        hashes: list[BlockHash],
    ) -> None:
        n = len(page_keys)
        assert len(full_pages) == n and len(swa_pages) == n and len(hashes) == n
        self.uid = uid
        self.parent = parent
        self.children: dict[PageKey, RadixNode] = {}
        self.start = start
        self.end = end
        self.page_keys = page_keys
        self.full_pages = full_pages
        self.swa_pages = swa_pages
        self.hashes = hashes
        self.tail_refs = [0] * n
        self.swa_locks = [0] * n
        self.swa_class_count = [0, 0, 0]  # present SWA pages per class DEEP, TAIL, LOCKED
        self.lock_ref = 0  # locks on this node or below it
        self.last_access = 0  # cache tick of the last match/insert through this node
        self.retain = False  # an insert ended here: a tail checkpoint
        self.point_applied = False  # tail_refs hold this node's window
        self.detached = False  # evicted (or dropped by reset): no longer in the tree

    def __repr__(self) -> str:
        return f"RadixNode(#{self.uid} [{self.start}, {self.end}) lock={self.lock_ref})"

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    @property
    def num_pages(self) -> int:
        return len(self.page_keys)

    @property
    def parent_hash(self) -> BlockHash:
        """The block hash of the page just before this node's first page."""
        p = self.parent
        return p.hashes[-1] if p is not None and p.hashes else ROOT_HASH

    @property
    def block_hashes(self) -> list[BlockHash]:
        return list(self.hashes)

    def token_ids(self, lo: int = 0, hi: int | None = None) -> list[int]:
        """The tokens of pages [lo, hi) of this node, flat."""
        return [t for key in self.page_keys[lo:hi] for t in key[0]]

    def swa_class(self, i: int) -> int | None:
        """Class of page i's SWA entry, None for a tombstone."""
        if self.swa_pages[i] is None:
            return None
        if self.swa_locks[i]:
            return LOCKED
        return TAIL if self.tail_refs[i] else DEEP

    def path(self) -> list[RadixNode]:
        """Nodes from the root's child down to this node (empty for the root)."""
        out: list[RadixNode] = []
        n: RadixNode | None = self
        while n is not None and not n.is_root:
            out.append(n)
            n = n.parent
        out.reverse()
        return out

    def split(self, k: int, uid: int, page_size: int) -> RadixNode:
        """Cut this node after its first k pages; the returned new node takes them and sits
        between this node and its parent. This node keeps its end, children, retention mark and
        identity (lock handles stay valid); the new node inherits its lock count."""
        assert 0 < k < self.num_pages and self.parent is not None
        mid = self.start + k * page_size
        upper = RadixNode(
            uid,
            self.parent,
            self.start,
            mid,
            self.page_keys[:k],
            self.full_pages[:k],
            self.swa_pages[:k],
            self.hashes[:k],
        )
        upper.tail_refs = self.tail_refs[:k]
        upper.swa_locks = self.swa_locks[:k]
        upper.lock_ref = self.lock_ref
        upper.last_access = self.last_access
        for i in range(k):
            cls = self.swa_class(i)
            if cls is not None:
                upper.swa_class_count[cls] += 1
                self.swa_class_count[cls] -= 1
        self.parent.children[self.page_keys[0]] = upper
        for name in ("page_keys", "full_pages", "swa_pages", "hashes", "tail_refs", "swa_locks"):
            setattr(self, name, getattr(self, name)[k:])
        self.start = mid
        self.parent = upper
        upper.children[self.page_keys[0]] = self
        return upper


def window_pages(node: RadixNode, window: int, page_size: int) -> Iterator[tuple[RadixNode, int]]:
    """(node, page index) of every page overlapping [node.end - window, node.end), last first."""
    lo = node.end - window
    n: RadixNode | None = node
    while n is not None and not n.is_root:
        for i in range(n.num_pages - 1, -1, -1):
            if n.start + (i + 1) * page_size <= lo:
                return
            yield n, i
        n = n.parent


def common_pages(node_keys: list[PageKey], keys: list[PageKey], k: int) -> int:
    """How many leading pages of node_keys equal keys[k:]."""
    m = 0
    limit = min(len(node_keys), len(keys) - k)
    while m < limit and node_keys[m] == keys[k + m]:
        m += 1
    return m


def safe_prefix_pages(swa: list[int | None], window: int, page_size: int) -> int:
    """Largest k <= len(swa) whose SWA pages overlapping [k*page_size - window, k*page_size)
    are all present (k = 0 always qualifies). One backward pass: a hole at page j rules out
    every k in (j, j + ceil(window / page_size)], so the next candidate is k = j."""
    need_max = -(-window // page_size)
    k = len(swa)
    while k > 0:
        for j in range(k - 1, k - min(k, need_max) - 1, -1):
            if swa[j] is None:
                k = j
                break
        else:
            return k
    return 0


def stored_events(kind: KVKind, node: RadixNode, pages: Sequence[int], page_size: int) -> list[BlockStored]:
    """One BlockStored per run of consecutive page indices (ascending) of node."""
    events: list[BlockStored] = []
    i = 0
    while i < len(pages):
        j = i
        while j + 1 < len(pages) and pages[j + 1] == pages[j] + 1:
            j += 1
        lo, hi = pages[i], pages[j] + 1
        events.append(
            BlockStored(
                kind=kind,
                block_hashes=tuple(node.hashes[lo:hi]),
                parent_hash=node.hashes[lo - 1] if lo else node.parent_hash,
                token_ids=tuple(node.token_ids(lo, hi)),
                page_size=page_size,
            )
        )
        i = j + 1
    return events
