"""Synthetic RNA structures whose 3D shape follows from their sequence.

Each structure is drawn in three steps:

1. **Secondary structure** (a tree): arms made of stems (>= ``min_stem_bp`` base pairs)
   separated by internal loops or bulges and closed by a hairpin loop; sometimes a three-way
   junction whose first branch stacks coaxially on the parent stem and whose second branch
   points away from it; short dangling ends.
2. **Sequence** designed for that tree: stems are Watson-Crick/G-U complementary, and no other
   run of that many complementary pairs exists anywhere (loop and mismatch
   letters are chosen so that stems cannot be extended or shifted and loops cannot pair).
   The base pairs are therefore exactly the complementary runs of the sequence: finding
   them is how a model can place the nucleotides.
3. **3D coordinates**, a deterministic function of the tree: stems, stacked internal-loop
   mismatches and dangling ends are ideal A-form helices; hairpin loops, bulges and junction
   linkers are arcs of ~5.8 A C3'-C3' steps relaxed away from the rest of the molecule, with
   each nucleotide's atoms placed from the A-form nucleotide in its local backbone frame.
   Candidates with clashes or stretched backbone are redrawn.

The A-form constants were fitted to the RNA-Puzzles natives (``docs/data.md`` gives the
procedure and the native statistics that the synthetic ones are compared with). Every
structure is drawn from its own generator seeded by ``(seed, split, index)``, so a sample
does not depend on how many others are drawn or in which order. Coordinates in Angstrom.
"""

from __future__ import annotations

import functools
import logging
import zlib
from dataclasses import dataclass, field

import numpy as np

from pipeline.data.features import ATOM_NAMES, NUCLEOTIDES, RNASample
from pipeline.data.geometry import C1, C3, C4, P, clash_count

log = logging.getLogger(__name__)

#: Bumped whenever the generator's output changes (it is part of the feature cache key).
GENERATOR_VERSION = 1
#: Helical twist (degrees) and rise (A) per base-pair step of the A-form stems.
HELIX_TWIST_DEG = 33.51
HELIX_RISE = 2.643
#: Strand-1 atoms (ATOM_NAMES order) of a base pair in its helix frame: z along the helix axis
#: (strand 1 runs 5'->3' towards +z), y across the pair (towards strand 2). Strand 2 is the
#: dyad image (x, -y, -z). Fitted to the stems of the RNA-Puzzles natives so that an ideal
#: helix reproduces their mean intra-nucleotide distances, C3'-C3' and P-P steps (5.80, 5.88
#: A), the C3'-P link (2.625 A) and the paired C1'-C1' distance (10.55 A).
PAIR_TEMPLATE = np.array(
    [
        [3.100, -8.568, 3.447],  # P
        [6.563, -7.049, 2.629],  # C4'
        [6.770, -5.866, 3.559],  # C3'
        [6.502, -5.104, 1.341],  # C1'
        [5.326, -4.240, 1.165],  # N9/N1
    ]
)
#: C3'(i)..C3'(i+1) distance (A) that loop nucleotides are spaced at (native mean 5.80).
LOOP_STEP = 5.8
#: C3'(i)..P(i+1) distance (A), bonded through O3' (native mean 2.625, sd 0.035).
LINK = 2.625
#: Fewest base pairs of a stem (molecules of up to 67 nucleotides; see min_stem_bp).
MIN_STEM_BP = 4
#: Most base pairs of one uninterrupted stem beyond the minimum.
STEM_SPAN_BP = 8
MIN_HAIRPIN = 3
#: Complementary letter pairs (Watson-Crick and G-U wobble).
_COMPLEMENT = np.zeros((4, 4), dtype=bool)
for _a, _b in ("AU", "UA", "GC", "CG", "GU", "UG"):
    _COMPLEMENT[NUCLEOTIDES.index(_a), NUCLEOTIDES.index(_b)] = True
#: Letter index -> indices it pairs with (unassigned, -1, pairs with nothing).
_COMPLEMENT_OF: dict[int, frozenset[int]] = {
    a: frozenset(int(b) for b in np.nonzero(_COMPLEMENT[a])[0]) for a in range(4)
}
_PAIR_TYPES = ("GC", "CG", "AU", "UA", "GU", "UG")
_PAIR_WEIGHTS = np.array([0.3, 0.3, 0.15, 0.15, 0.05, 0.05])
#: Unpaired nucleotides are A-rich, as in natural loops.
_LOOP_WEIGHTS = np.array([0.4, 0.2, 0.15, 0.25])  # A, C, G, U
_HAIRPIN_SIZES = np.array([3, 4, 5, 6, 7, 8])
_HAIRPIN_WEIGHTS = np.array([0.05, 0.35, 0.2, 0.2, 0.1, 0.1])
#: Internal loops as (5' side, 3' side) unpaired counts: bulges and symmetric/asymmetric loops.
_INTERNAL_LOOPS = ((1, 0), (0, 1), (2, 0), (0, 2), (3, 0), (0, 3), (1, 1), (2, 2), (1, 2),
                   (2, 1), (2, 3), (3, 2), (3, 3))
_MAX_ATTEMPTS = 500


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Frame:
    """A helix frame: rotation (columns x, y, z in world coordinates) and origin (A)."""

    rot: np.ndarray
    origin: np.ndarray

    def advanced(self, steps: int) -> Frame:
        """The frame ``steps`` base-pair steps further along the helix."""
        rot = self.rot @ _rot_z(steps * HELIX_TWIST_DEG)
        return Frame(rot, self.origin + self.rot[:, 2] * steps * HELIX_RISE)

    def atoms(self, pos: int, strand: int) -> np.ndarray:
        """(5, 3) world coordinates of the nucleotide of ``strand`` (1 or 2) at pair ``pos``."""
        local = PAIR_TEMPLATE if strand == 1 else PAIR_TEMPLATE * np.array([1.0, -1.0, -1.0])
        local = local @ _rot_z(pos * HELIX_TWIST_DEG).T + np.array([0.0, 0.0, pos * HELIX_RISE])
        return local @ self.rot.T + self.origin


def _rot_z(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _backbone_frame(here: np.ndarray, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Orthonormal frame (rows) at a C3': e1 towards the previous C3', e2 towards the next
    one (its part perpendicular to e1), e3 = e1 x e2."""
    e1 = _unit(prev - here)
    towards_next = nxt - here
    towards_next = towards_next - (towards_next @ e1) * e1
    if np.linalg.norm(towards_next) < 1e-6:  # straight trace: any perpendicular will do
        towards_next = np.cross(e1, [0.0, 0.0, 1.0] if abs(e1[2]) < 0.9 else [1.0, 0.0, 0.0])
    e2 = _unit(towards_next)
    return np.stack([e1, e2, np.cross(e1, e2)])


def _nucleotide_template() -> np.ndarray:
    """The A-form nucleotide's atoms relative to its C3', in its backbone frame (5, 3)."""
    helix = Frame(np.eye(3), np.zeros(3))
    prev, here, nxt = (helix.atoms(k, 1) for k in (-1, 0, 1))
    frame = _backbone_frame(here[C3], prev[C3], nxt[C3])
    return (here - here[C3]) @ frame.T


#: Placing a loop nucleotide with this template in the frame of its C3' trace keeps the
#: A-form nucleotide rigid and its P at the A-form distance (2.625 A) from the previous C3',
#: because the C3'-C3' step of loops equals the A-form one.
_NUCLEOTIDE_TEMPLATE = _nucleotide_template()
#: A-form intra-nucleotide distances (A), (5, 5).
_INTRA = np.linalg.norm(_NUCLEOTIDE_TEMPLATE[:, None] - _NUCLEOTIDE_TEMPLATE[None], axis=-1)
#: A-form distances (A) from each atom of a nucleotide to the next nucleotide's C3'.
_TO_NEXT_C3 = np.linalg.norm(
    Frame(np.eye(3), np.zeros(3)).atoms(0, 1) - Frame(np.eye(3), np.zeros(3)).atoms(1, 1)[C3],
    axis=-1,
)


# --------------------------------------------------------------------------- topology


@dataclass
class Junction:
    """A three-way junction closing an arm: two child arms joined by linkers ``l0, l1, l2``."""

    linkers: tuple[int, int, int]
    arms: tuple[Arm, Arm]


@dataclass
class Arm:
    """Stems (bp, bottom up) separated by internal loops, closed by a hairpin or a junction."""

    stems: list[int]
    loops: list[tuple[int, int]] = field(default_factory=list)
    hairpin: int = 0
    junction: Junction | None = None

    def length(self) -> int:
        """Nucleotides in the arm."""
        n = 2 * sum(self.stems) + sum(a + b for a, b in self.loops)
        if self.junction is None:
            return n + self.hairpin
        return n + sum(self.junction.linkers) + sum(arm.length() for arm in self.junction.arms)


@dataclass
class Topology:
    """A whole molecule: 5' dangling end, the root arm, 3' dangling end."""

    tail5: int
    arm: Arm
    tail3: int

    def length(self) -> int:
        return self.tail5 + self.arm.length() + self.tail3


@dataclass(eq=False)
class _Res:
    """Where one nucleotide goes: a helix slot, or a loop with a direction hint."""

    kind: str  # "helix" | "hairpin" | "radial"
    frame: Frame
    pos: int = 0
    strand: int = 1


@dataclass
class SyntheticStructure:
    """A synthetic structure with its designed secondary structure."""

    sample: RNASample
    pairs: list[tuple[int, int]]  # designed base pairs (i < j), residue indices
    dot_bracket: str
    topology: Topology
    min_stem: int  # fewest pairs of a stem; no other complementary run is this long


# --------------------------------------------------------------------------- sampling


def min_stem_bp(max_length: int) -> int:
    """Fewest base pairs of a designed stem (and one more than the longest accidental run).

    Accidental complementary runs of k pairs (G-U included) occur about L^2/2 * 0.375^k times
    in a random sequence of length L. The stem minimum is the smallest k >= MIN_STEM_BP that
    keeps this expectation at or below that of k = 4 at L = 64 (about 45), so that sequences
    without accidental runs of k remain easy to find: 4 up to 67 nucleotides, 5 up to 110,
    6 up to 179, 7 up to 293.
    """
    k = MIN_STEM_BP
    while max_length**2 / 2 * 0.375**k > 45.0:
        k += 1
    return k


def _sample_arm(rng: np.random.Generator, budget: int, min_stem: int) -> Arm | None:
    """An arm ending in a hairpin loop with about ``budget`` nucleotides (None if too small).

    Stems hold ``min_stem`` to ``min_stem + STEM_SPAN_BP`` base pairs: longer helices are broken by
    internal loops, as in natural RNAs (and very long stems make sequences whose only
    complementary runs are the designed ones hard to find).
    """
    hairpin = int(rng.choice(_HAIRPIN_SIZES, p=_HAIRPIN_WEIGHTS))
    n_stems = max(1, int(round(budget / rng.uniform(16.0, 28.0))))
    for _ in range(10):
        if n_stems < 1:
            return None
        loops = [_INTERNAL_LOOPS[rng.integers(len(_INTERNAL_LOOPS))] for _ in range(n_stems - 1)]
        paired = budget - hairpin - sum(a + b for a, b in loops)
        n_bp = paired // 2
        if n_bp < min_stem * n_stems:
            n_stems -= 1
            continue
        if n_bp > (min_stem + STEM_SPAN_BP) * n_stems:
            n_stems += 1
            continue
        stems = [min_stem] * n_stems
        for _ in range(n_bp - min_stem * n_stems):  # spread the rest over stems with room
            room = [k for k, n in enumerate(stems) if n < min_stem + STEM_SPAN_BP]
            stems[room[int(rng.integers(len(room)))]] += 1
        # an odd leftover nucleotide goes to the hairpin loop
        return Arm(stems=stems, loops=loops, hairpin=hairpin + paired % 2)
    return None


def _sample_topology(
    rng: np.random.Generator, min_length: int, max_length: int, min_stem: int
) -> Topology | None:
    target = int(rng.integers(min_length, max_length + 1))
    tail5 = int(rng.choice([0, 0, 1, 2]))
    tail3 = int(rng.choice([0, 0, 1, 2]))
    budget = target - tail5 - tail3
    if budget >= 6 * min_stem + 22 and rng.random() < 0.5:
        arm = _sample_junction_arm(rng, budget, min_stem)
    else:
        arm = _sample_arm(rng, budget, min_stem)
    if arm is None:
        return None
    topology = Topology(tail5, arm, tail3)
    return topology if min_length <= topology.length() <= max_length else None


def _sample_junction_arm(rng: np.random.Generator, budget: int, min_stem: int) -> Arm | None:
    """A root arm closed by a three-way junction; linkers are as long as the layout needs."""
    parent_budget = int(budget * rng.uniform(0.15, 0.35))
    parent = _sample_arm(rng, parent_budget + 4, min_stem)  # the hairpin of this draw is discarded
    if parent is None:
        return None
    parent.hairpin = 0
    rest = budget - parent.length() - 6  # about 6 linker nucleotides
    share = rng.uniform(0.35, 0.65)
    first = _sample_arm(rng, int(rest * share), min_stem)
    second = _sample_arm(rng, rest - int(rest * share), min_stem)
    if first is None or second is None:
        return None
    top = sum(parent.stems) + sum(min(a, b) for a, b in parent.loops) - 1
    _, span1, span2 = _junction_layout(top)
    l0 = int(rng.choice([0, 0, 1, 2]))
    l1 = max(int(rng.integers(1, 4)), _linker_needed(span1))
    l2 = max(int(rng.integers(1, 4)), _linker_needed(span2))
    parent.junction = Junction(linkers=(l0, l1, l2), arms=(first, second))
    return parent


def _linker_needed(span: float) -> int:
    """Fewest loop nucleotides whose ~5.8 A steps bridge ``span`` A with some slack."""
    return max(0, int(np.ceil(span / (0.85 * LOOP_STEP))) - 1)


@functools.lru_cache(maxsize=256)
def _junction_layout(top: int) -> tuple[Frame, float, float]:
    """Frame of a junction's second branch: perpendicular to the parent axis, beside it.

    The parent is the root helix (identity frame) whose last position is ``top``; the first
    branch continues it (coaxial stack). The second starts 15 or 18 A from the parent axis at
    the height of the junction and points away from it; of a fixed grid of azimuths and spins
    the placement is taken that keeps 5 A clear of the parent and the first branch and needs
    the shortest linkers. Deterministic, hence cached.

    Returns the frame and the C3'-C3' spans (A) the two linkers must bridge.
    """
    frame = Frame(np.eye(3), np.zeros(3))
    first = frame.advanced(top + 1)
    occupied = np.concatenate(
        [frame.atoms(top - k, s) for k in range(4) for s in (1, 2)]
        + [first.atoms(k, s) for k in range(4) for s in (1, 2)]
    )
    start1 = first.atoms(0, 2)[C3]  # 3' end of the first branch
    end2 = frame.atoms(top, 2)[C3]  # where the last linker rejoins the parent
    centre = np.array([0.0, 0.0, (top + 0.5) * HELIX_RISE])
    local = Frame(np.eye(3), np.zeros(3))
    branch_local = np.concatenate([local.atoms(k, s) for k in range(5) for s in (1, 2)])
    c3_first = local.atoms(0, 1)[C3]
    c3_last = local.atoms(0, 2)[C3]
    candidates = []
    for distance in (15.0, 18.0):
        for phi in np.radians(np.arange(0.0, 360.0, 22.5)):
            radial = np.array([np.cos(phi), np.sin(phi), 0.0])
            for psi in np.arange(0.0, 360.0, 30.0):
                x_axis = _rot_about(radial, psi) @ np.array([0.0, 0.0, 1.0])
                rot = np.stack([x_axis, np.cross(radial, x_axis), radial], axis=1)
                candidates.append(Frame(rot, centre + distance * radial))
    rots = np.stack([c.rot for c in candidates])
    origins = np.stack([c.origin for c in candidates])
    branch = np.einsum("kij,aj->kai", rots, branch_local) + origins[:, None]
    gap = np.linalg.norm(branch[:, :, None] - occupied[None, None], axis=-1).min(axis=(1, 2))
    span1 = np.linalg.norm(np.einsum("kij,j->ki", rots, c3_first) + origins - start1, axis=-1)
    span2 = np.linalg.norm(np.einsum("kij,j->ki", rots, c3_last) + origins - end2, axis=-1)
    score = np.where(gap >= 5.0, span1 + span2, np.inf)
    best = int(np.argmin(score))
    if not np.isfinite(score[best]):
        raise RuntimeError("junction layout grid found no clear placement")
    return candidates[best], float(span1[best]), float(span2[best])


def _rot_about(axis: np.ndarray, deg: float) -> np.ndarray:
    """Rotation matrix by ``deg`` degrees about a unit ``axis`` (Rodrigues)."""
    a = np.radians(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)


# --------------------------------------------------------------------------- emission


def _emit_arm(arm: Arm, frame: Frame, pairs: list[tuple[_Res, _Res]]) -> list[_Res]:
    """Nucleotides of an arm in sequence order, with their placements; appends base pairs."""
    left: list[_Res] = []
    right: list[_Res] = []  # bottom to top; reversed into sequence order at the end
    pos = 0
    for s, n_bp in enumerate(arm.stems):
        for _ in range(n_bp):
            a, b = _Res("helix", frame, pos, 1), _Res("helix", frame, pos, 2)
            left.append(a)
            right.append(b)
            pairs.append((a, b))
            pos += 1
        if s == len(arm.stems) - 1:
            break
        n_left, n_right = arm.loops[s]
        # Mismatches of an internal loop stack like pairs (non-canonical pairs continue the
        # helix); what one side has in excess bulges out.
        for _ in range(min(n_left, n_right)):
            left.append(_Res("helix", frame, pos, 1))
            right.append(_Res("helix", frame, pos, 2))
            pos += 1
        left.extend(_Res("radial", frame) for _ in range(n_left - min(n_left, n_right)))
        right.extend(_Res("radial", frame) for _ in range(n_right - min(n_left, n_right)))
    if arm.junction is None:
        middle = [_Res("hairpin", frame.advanced(pos - 1)) for _ in range(arm.hairpin)]
    else:
        l0, l1, l2 = arm.junction.linkers
        first_arm, second_arm = arm.junction.arms
        # junctions close the root arm only, whose frame is the identity
        second_frame, _, _ = _junction_layout(pos - 1)
        middle = (
            [_Res("radial", frame) for _ in range(l0)]
            + _emit_arm(first_arm, frame.advanced(pos), pairs)
            + [_Res("radial", frame) for _ in range(l1)]
            + _emit_arm(second_arm, second_frame, pairs)
            + [_Res("radial", frame) for _ in range(l2)]
        )
    return left + middle + right[::-1]


def _emit(topology: Topology) -> tuple[list[_Res], list[tuple[int, int]]]:
    root = Frame(np.eye(3), np.zeros(3))
    pair_objs: list[tuple[_Res, _Res]] = []
    # Dangling ends continue their strand's helix (they stack on the terminal pair).
    tail5 = [_Res("helix", root, -k, 1) for k in range(topology.tail5, 0, -1)]
    tail3 = [_Res("helix", root, -k, 2) for k in range(1, topology.tail3 + 1)]
    residues = tail5 + _emit_arm(topology.arm, root, pair_objs) + tail3
    index = {id(r): i for i, r in enumerate(residues)}
    pairs = sorted(tuple(sorted((index[id(a)], index[id(b)]))) for a, b in pair_objs)
    return residues, pairs


# --------------------------------------------------------------------------- sequence


def _violating_run(seq: list[int], partner: list[int], p: int, min_run: int) -> list[int] | None:
    """Positions of a complementary run through ``p`` that must not exist, else None.

    A run is >= ``min_run`` stacked antiparallel complementary pairs (with a loop of more than
    MIN_HAIRPIN between); it must not exist when it contains a pair that is not designed.
    Unassigned positions (-1) break runs. Plain Python: the lists are short and numpy's
    per-call overhead would dominate.
    """
    n = len(seq)
    letter = seq[p]
    if letter < 0:
        return None
    partners_of = _COMPLEMENT_OF[letter]
    for q in range(n):
        if abs(q - p) <= MIN_HAIRPIN or seq[q] not in partners_of:
            continue
        i, j = (p, q) if p < q else (q, p)
        run, foreign = [i, j], partner[i] != j
        a, b = i - 1, j + 1
        while a >= 0 and b < n and seq[b] in _COMPLEMENT_OF.get(seq[a], ()):
            run += [a, b]
            foreign = foreign or partner[a] != b
            a, b = a - 1, b + 1
        a, b = i + 1, j - 1
        while b - a > MIN_HAIRPIN and seq[b] in _COMPLEMENT_OF.get(seq[a], ()):
            run += [a, b]
            foreign = foreign or partner[a] != b
            a, b = a + 1, b - 1
        if foreign and len(run) >= 2 * min_run:
            return run
    return None


def design_sequence(
    rng: np.random.Generator,
    length: int,
    pairs: list[tuple[int, int]],
    *,
    min_run: int = MIN_STEM_BP,
    max_nodes: int | None = None,
) -> str | None:
    """A sequence whose complementary runs of >= ``min_run`` pairs are exactly ``pairs``' stems.

    Pairs get Watson-Crick or G-U letters, unpaired positions A-rich loop letters, tried in a
    random weighted order. The search assigns positions 5' to 3' (both letters of a pair at
    once) and, when a position has no admissible letter, jumps back to the latest position
    that took part in the runs that ruled its letters out (conflict-directed backjumping;
    plain backtracking would retry everything in between). Returns None when ``max_nodes``
    (default 40 per nucleotide) assignments did not find a sequence.
    """
    seq = [-1] * length
    partner = [-1] * length
    for i, j in pairs:
        partner[i], partner[j] = j, i
    units: list[tuple[int, ...]] = sorted(
        [tuple(p) for p in pairs] + [(p,) for p in range(length) if partner[p] < 0]
    )
    depth_of = {p: d for d, unit in enumerate(units) for p in unit}
    options: list[list[tuple[int, ...]]] = []
    for unit in units:
        if len(unit) == 2:
            n_types = len(_PAIR_TYPES)
            order = rng.choice(n_types, size=n_types, replace=False, p=_PAIR_WEIGHTS)
            options.append([tuple(NUCLEOTIDES.index(c) for c in _PAIR_TYPES[k]) for k in order])
        else:
            order = rng.choice(4, size=4, replace=False, p=_LOOP_WEIGHTS)
            options.append([(int(k),) for k in order])
    budget = max_nodes if max_nodes is not None else 40 * length
    choice = [-1] * len(units)
    conflicts: list[set[int]] = [set() for _ in units]
    depth = 0
    while depth < len(units):
        unit = units[depth]
        for p in unit:
            seq[p] = -1
        choice[depth] += 1
        if choice[depth] >= len(options[depth]):
            if not conflicts[depth]:
                return None
            back = max(conflicts[depth])
            conflicts[back] |= conflicts[depth] - {back}
            for d in range(back + 1, depth + 1):
                choice[d] = -1
                conflicts[d] = set()
                for p in units[d]:
                    seq[p] = -1
            depth = back
            continue
        budget -= 1
        if budget < 0:
            return None
        for p, letter in zip(unit, options[depth][choice[depth]]):
            seq[p] = letter
        run = next((r for r in (_violating_run(seq, partner, p, min_run) for p in unit) if r), None)
        if run is None:
            depth += 1
        else:
            conflicts[depth] |= {depth_of[p] for p in run if depth_of[p] < depth}
    return "".join(NUCLEOTIDES[c] for c in seq)


def complementary_runs(sequence: str, min_run: int = MIN_STEM_BP) -> list[list[tuple[int, int]]]:
    """All maximal runs of >= ``min_run`` stacked complementary (WC/GU) pairs of a sequence.

    Each run is a list of (i, j), i < j, with j - i > ``MIN_HAIRPIN``; used to check that the
    designed stems are the only ones a sequence can form.
    """
    seq = np.array([NUCLEOTIDES.index(c) for c in sequence])
    n = len(seq)
    runs = []
    for total in range(n + n - 1):  # anti-diagonals i + j = total
        run: list[tuple[int, int]] = []
        for i in range(max(0, total - n + 1), (total + 1) // 2):
            j = total - i
            if j - i > MIN_HAIRPIN and _COMPLEMENT[seq[i], seq[j]]:
                run.append((i, j))
                continue
            if len(run) >= min_run:
                runs.append(run)
            run = []
        if len(run) >= min_run:
            runs.append(run)
    return runs


# --------------------------------------------------------------------------- coordinates


def _place_loop(
    trace_a: np.ndarray, trace_b: np.ndarray, n: int, bulge: np.ndarray
) -> np.ndarray:
    """C3' positions of ``n`` loop nucleotides on an arc from ``trace_a`` to ``trace_b``.

    The arc lies in the plane of the chord and ``bulge`` and is cut into n+1 equal chords of
    ``LOOP_STEP`` A where the gap allows (a straight line where it is too wide).
    """
    chord = trace_b - trace_a
    d = float(np.linalg.norm(chord))
    e = _unit(chord)
    u = bulge - (bulge @ e) * e
    if np.linalg.norm(u) < 1e-6:
        u = np.cross(e, [0.0, 0.0, 1.0] if abs(e[2]) < 0.9 else [1.0, 0.0, 0.0])
    u = _unit(u)
    if d >= (n + 1) * LOOP_STEP * 0.999:
        t = np.arange(1, n + 1)[:, None] / (n + 1)
        return trace_a + t * chord
    # chord length of one step as a function of the arc's total angle phi is increasing:
    # bisect for the angle at which it equals LOOP_STEP.
    lo, hi = 1e-6, 2 * np.pi - 1e-6
    for _ in range(60):
        phi = 0.5 * (lo + hi)
        step = d * np.sin(phi / (2 * (n + 1))) / np.sin(phi / 2)
        lo, hi = (phi, hi) if step < LOOP_STEP else (lo, phi)
    radius = d / (2 * np.sin(phi / 2))
    centre_y = -radius * np.cos(phi / 2)
    gamma = -phi / 2 + np.arange(1, n + 1) * phi / (n + 1)
    mid = 0.5 * (trace_a + trace_b)
    x = radius * np.sin(gamma)
    y = centre_y + radius * np.cos(gamma)
    return mid + x[:, None] * e + y[:, None] * u


def _relax_loop(
    trace: np.ndarray,
    anchor_a: np.ndarray,
    anchor_b: np.ndarray,
    others: np.ndarray,
    n_iter: int = 100,
) -> np.ndarray:
    """Move loop C3' atoms to ~LOOP_STEP A spacing and away from other atoms (gradient descent).

    Energy: (|step| - LOOP_STEP)^2 over the chain through the fixed anchor C3' atoms, plus
    (r0 - d)^2 when a loop C3' comes within r0 = 6.0 A of another loop C3' (not a neighbour)
    or within 5.0 A of an atom of the rest of the molecule.
    """
    x = trace.copy()
    n = len(x)
    if len(others):  # only atoms the loop can reach matter
        reach = np.linalg.norm(others[:, None] - x[None], axis=-1).min(axis=1) < 12.0
        others = others[reach]
    for _ in range(n_iter):
        chain = np.concatenate([anchor_a[None], x, anchor_b[None]])
        diff = chain[1:] - chain[:-1]
        dist = np.linalg.norm(diff, axis=-1, keepdims=True)
        force = 2 * (dist - LOOP_STEP) * diff / np.maximum(dist, 1e-6)  # dE/d(chain[k+1])
        grad = force[:-1] - force[1:]
        if len(others):
            delta = x[:, None] - others[None]
            dd = np.linalg.norm(delta, axis=-1, keepdims=True)
            push = np.where(dd < 5.0, -2 * (5.0 - dd) * delta / np.maximum(dd, 1e-6), 0.0)
            grad += push.sum(axis=1)
        if n > 2:
            delta = x[:, None] - x[None]
            dd = np.linalg.norm(delta, axis=-1, keepdims=True)
            far = np.abs(np.arange(n)[:, None] - np.arange(n)[None])[..., None] > 1
            push = np.where(far & (dd < 6.0), -2 * (6.0 - dd) * delta / np.maximum(dd, 1e-6), 0.0)
            grad += push.sum(axis=1)
        x -= 0.1 * grad
    return x


def _reattach_phosphate(atoms: np.ndarray, prev_c3: np.ndarray, n_iter: int = 50) -> np.ndarray:
    """P of a helix nucleotide that follows a loop, moved to bond to the loop's last C3'.

    Least squares over the P position: the O3'-P link to ``prev_c3`` (weight 10) and the
    A-form P..C4', P..C3', P..C1' distances of its own nucleotide, starting from the A-form P.
    """
    targets = [(prev_c3, LINK, 10.0)] + [
        (atoms[a], float(np.linalg.norm(_NUCLEOTIDE_TEMPLATE[P] - _NUCLEOTIDE_TEMPLATE[a])), 1.0)
        for a in (C4, C3, C1)
    ]
    p = atoms[P].copy()
    for _ in range(n_iter):
        grad = np.zeros(3)
        for centre, dist, weight in targets:
            delta = p - centre
            d = max(float(np.linalg.norm(delta)), 1e-6)
            grad += 2 * weight * (d - dist) * delta / d
        p -= 0.02 * grad
    return p


def _place_nucleotide(
    c3: np.ndarray, frame: np.ndarray, next_c3: np.ndarray, others: np.ndarray
) -> np.ndarray:
    """Atoms (5, 3) of a loop nucleotide at trace point ``c3`` with backbone ``frame``.

    The nucleotide may spin about the axis to the previous C3' (e1) without changing its
    bond to the previous nucleotide. Of a fixed grid of spins, the one is taken with the
    least overlap (atoms closer than 3.6 A) with ``others`` plus a small penalty for
    distances to the next C3' that differ from A-form (so that the next nucleotide's P
    finds room); the unspun one on ties.
    """
    spun = np.einsum("sij,aj->sai", _SPUN_TEMPLATES, _NUCLEOTIDE_TEMPLATE)
    atoms = c3 + spun @ frame  # (S, 5, 3)
    score = 0.1 * ((np.linalg.norm(atoms - next_c3, axis=-1) - _TO_NEXT_C3) ** 2).sum(axis=-1)
    if len(others):
        others = others[np.linalg.norm(others - c3, axis=-1) < 12.0]
        d = np.linalg.norm(atoms[:, :, None] - others[None, None], axis=-1)
        score = score + 10.0 * (np.clip(3.6 - d, 0.0, None) ** 2).sum(axis=(1, 2))
    return atoms[int(np.argmin(score))]  # argmin takes the first (least spun) on ties


_X_AXIS = np.array([1.0, 0.0, 0.0])
#: Spins (degrees) tried for loop nucleotides, the unspun one first (see _place_nucleotide).
_SPINS = tuple(float(d) for k in range(13) for d in ({k * 15, -k * 15} if 0 < k < 12 else {k * 15}))
#: Rotations about the frame's own x axis (e1) for each spin, (S, 3, 3).
_SPUN_TEMPLATES = np.stack([_rot_about(_X_AXIS, deg) for deg in _SPINS])


def _coordinates(residues: list[_Res]) -> np.ndarray | None:
    """(L, 5, 3) coordinates for placed residues; None if a loop cannot be built cleanly."""
    n = len(residues)
    coords = np.full((n, len(ATOM_NAMES), 3), np.nan)
    for i, res in enumerate(residues):
        if res.kind == "helix":
            coords[i] = res.frame.atoms(res.pos, res.strand)
    movable = np.zeros((n, len(ATOM_NAMES)), dtype=bool)
    i = 0
    while i < n:
        if residues[i].kind == "helix":
            i += 1
            continue
        start = i
        while i < n and residues[i].kind != "helix":
            i += 1
        if start == 0 or i == n:
            return None  # loops always sit between helices; an open end is a bug in emission
        a, b = coords[start - 1, C3], coords[i, C3]
        res = residues[start]
        if res.kind == "hairpin":
            bulge = res.frame.rot[:, 2]
        else:  # radially out from the helix the loop belongs to
            axis = res.frame.rot[:, 2]
            rel = 0.5 * (a + b) - res.frame.origin
            bulge = rel - (rel @ axis) * axis
        trace = _place_loop(a, b, i - start, bulge)
        placed = np.isfinite(coords[:, 0, 0])
        placed[[start - 1, i]] = False  # the anchors' own atoms sit next to the loop by design
        trace = _relax_loop(trace, a, b, coords[placed].reshape(-1, 3))
        full_trace = np.concatenate([a[None], trace, b[None]])
        # The nucleotide after the loop bonds to the loop's last C3', not to its helix
        # neighbour: move its P first so that the loop nucleotides keep clear of it.
        coords[i, P] = _reattach_phosphate(coords[i], trace[-1])
        movable[start:i] = True
        movable[i, P] = True
        for k in range(i - start):
            frame = _backbone_frame(full_trace[k + 1], full_trace[k], full_trace[k + 2])
            placed = np.isfinite(coords[:, 0, 0])
            coords[start + k] = _place_nucleotide(
                full_trace[k + 1], frame, full_trace[k + 2], coords[placed].reshape(-1, 3)
            )
    return _refine(coords, movable)


# Step size, iteration cap and momentum of _refine: the largest step that stays stable with
# restraint weights of 10 on atoms in ~15 restraints; most loops converge well before the cap.
_REFINE_STEP = 0.0015
_REFINE_ITER = 250
_REFINE_MOMENTUM = 0.8


def _refine(coords: np.ndarray, movable: np.ndarray, n_iter: int = _REFINE_ITER) -> np.ndarray:
    """Relax the movable atoms (loop nucleotides, re-attached P) by gradient descent.

    Flat-bottom restraints: the A-form intra-nucleotide distances; the O3'-bridged C3'(i)..P(i+1)
    link (``LINK``) and C4'(i)..P(i+1) (3.45-3.94 A, the native 5-95 % range); C3'-C3' and
    P-P steps within 5.4-6.2 A and 5.3-6.8 A; and no two atoms of different residues (bonded
    pairs aside) closer than 3.3 A. Helix atoms other than a re-attached P stay fixed, so
    paired geometry is exact.

    Parameters
    ----------
    coords : (L, 5, 3) coordinates (A).
    movable : (L, 5) bool.
    """
    n_res, n_atoms = movable.shape
    if not movable.any():
        return coords
    flat = coords.reshape(-1, 3)
    free_flat = movable.reshape(-1)
    residue_flat = np.repeat(np.arange(n_res), n_atoms)
    # Work on the movable atoms and the fixed atoms within reach of them only.
    near = np.linalg.norm(flat[:, None] - flat[free_flat][None], axis=-1).min(axis=1) < 10.0
    keep = np.nonzero(near | free_flat)[0]
    local = -np.ones(len(flat), dtype=np.int64)
    local[keep] = np.arange(len(keep))
    x = flat[keep].copy()
    free = free_flat[keep]
    residue = residue_flat[keep]
    rows = []  # (i, j, lo, hi, weight) in local indices
    moving_res = np.nonzero(movable.any(axis=1))[0]
    for r in moving_res:
        for a in range(n_atoms):
            for b in range(a + 1, n_atoms):
                ia, ib = local[r * n_atoms + a], local[r * n_atoms + b]
                if ia >= 0 and ib >= 0:
                    rows.append((ia, ib, _INTRA[a, b], _INTRA[a, b], 10.0))
    for r in sorted(set(moving_res.tolist()) | set((moving_res - 1).tolist())):
        if not 0 <= r < n_res - 1:
            continue
        for a, lo, hi, weight in ((C3, LINK, LINK, 10.0), (C4, 3.45, 3.94, 10.0)):
            ia, ib = local[r * n_atoms + a], local[(r + 1) * n_atoms + P]
            if ia >= 0 and ib >= 0:
                rows.append((ia, ib, lo, hi, weight))
        for a, lo, hi in ((C3, 5.4, 6.2), (P, 5.3, 6.8)):
            ia, ib = local[r * n_atoms + a], local[(r + 1) * n_atoms + a]
            if ia >= 0 and ib >= 0:
                rows.append((ia, ib, lo, hi, 5.0))
    table = np.array(rows, dtype=np.float64)
    bond_i, bond_j = table[:, 0].astype(np.int64), table[:, 1].astype(np.int64)
    lo, hi, weight = table[:, 2], table[:, 3], table[:, 4]
    n = len(x)
    bonded_keys = np.minimum(bond_i, bond_j) * n + np.maximum(bond_i, bond_j)
    free_idx = np.nonzero(free)[0]
    pairs_i = pairs_j = np.zeros(0, dtype=np.int64)
    velocity = np.zeros_like(x)
    for it in range(n_iter):
        if it % 25 == 0:  # refresh the neighbour list of the moving atoms
            d = np.linalg.norm(x[free_idx][:, None] - x[None], axis=-1)
            fi, oj = np.nonzero((d < 6.0) & (residue[free_idx][:, None] != residue[None]))
            a, b = free_idx[fi], oj
            keys = np.unique(np.minimum(a, b) * n + np.maximum(a, b))
            keys = keys[~np.isin(keys, bonded_keys)]
            pairs_i, pairs_j = keys // n, keys % n
        all_i = np.concatenate([bond_i, pairs_i])
        all_j = np.concatenate([bond_j, pairs_j])
        delta = x[all_i] - x[all_j]
        dist = np.maximum(np.sqrt((delta**2).sum(axis=-1)), 1e-6)
        nb = len(bond_i)
        excess = np.empty_like(dist)
        db = dist[:nb]
        excess[:nb] = weight * np.where(db < lo, db - lo, np.where(db > hi, db - hi, 0.0))
        excess[nb:] = 10.0 * np.minimum(dist[nb:] - 3.3, 0.0)
        if it % 25 == 24 and np.abs(excess).max(initial=0.0) < 0.02:
            break  # every restraint met: nothing left to move
        g = (2 * excess / dist)[:, None] * delta
        grad = np.stack(
            [np.bincount(all_i, g[:, k], n) - np.bincount(all_j, g[:, k], n) for k in range(3)],
            axis=1,
        )
        grad[~free] = 0.0
        # heavy-ball momentum: the restraint network is stiff, plain descent crawls
        velocity = _REFINE_MOMENTUM * velocity - _REFINE_STEP * grad
        x += velocity
    out = flat.copy()
    out[keep] = x
    return out.reshape(coords.shape)


def _acceptable(coords: np.ndarray) -> bool:
    """Backbone steps within the native range and no clashes."""
    steps = np.linalg.norm(coords[1:, C3] - coords[:-1, C3], axis=-1)
    links = np.linalg.norm(coords[1:, P] - coords[:-1, C3], axis=-1)
    if steps.min() < 5.0 or steps.max() > 6.6 or links.max() > 3.4:
        return False
    probe = _sample_from(coords, "probe", "A" * len(coords))
    return clash_count(probe) == 0


def _sample_from(coords: np.ndarray, name: str, sequence: str) -> RNASample:
    n = len(sequence)
    return RNASample(
        name=name,
        sequence=sequence,
        coords=coords.astype(np.float32),
        atom_mask=np.ones((n, len(ATOM_NAMES)), dtype=bool),
        residue_index=np.arange(1, n + 1, dtype=np.int64),
        chain_index=np.zeros(n, dtype=np.int64),
    )


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def dot_bracket(length: int, pairs: list[tuple[int, int]]) -> str:
    """Dot-bracket string of nested base pairs."""
    chars = ["."] * length
    for i, j in pairs:
        chars[i], chars[j] = "(", ")"
    return "".join(chars)


def generate_structure(
    rng: np.random.Generator, *, min_length: int, max_length: int, name: str = "synthetic"
) -> SyntheticStructure:
    """Draw one synthetic structure of ``min_length`` to ``max_length`` nucleotides.

    Returns a :class:`SyntheticStructure`: the :class:`RNASample` (one chain, residues
    numbered 1..L, all atoms present, centred at the origin in a random orientation, A) with
    its designed base pairs. Stems have at least ``min_stem_bp(max_length)`` pairs, and no
    other complementary run that long exists in the sequence.
    """
    if max_length < min_length:
        raise ValueError(f"max_length must be >= min_length, but got {max_length} < {min_length}")
    min_stem = min_stem_bp(max_length)
    shortest = 2 * min_stem + MIN_HAIRPIN
    if max_length < shortest:
        raise ValueError(f"max_length must be at least {shortest}, but got {max_length}")
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        topology = _sample_topology(rng, min_length, max_length, min_stem)
        if topology is None:
            continue
        residues, pairs = _emit(topology)
        # A few short searches with fresh letter orders beat one long one (see design_sequence).
        for _ in range(6):
            sequence = design_sequence(
                rng, len(residues), pairs, min_run=min_stem, max_nodes=5 * len(residues)
            )
            if sequence is not None:
                break
        if sequence is None:
            continue
        coords = _coordinates(residues)
        if coords is None or not _acceptable(coords):
            continue
        coords = (coords - coords.mean(axis=(0, 1))) @ _random_rotation(rng).T
        sample = _sample_from(coords, name, sequence)
        brackets = dot_bracket(len(sequence), pairs)
        log.debug("%s: %d nt after %d draws", name, len(sequence), attempt)
        return SyntheticStructure(sample, pairs, brackets, topology, min_stem)
    raise RuntimeError(
        f"no acceptable synthetic structure in {_MAX_ATTEMPTS} draws for lengths "
        f"{min_length}..{max_length}"
    )


def _stream(split: str) -> int:
    """A stable integer for a split name (Python's ``hash`` of a str changes per process)."""
    return zlib.crc32(split.encode())


def synthetic_structure(
    seed: int, index: int, *, split: str = "train", min_length: int = 24, max_length: int = 64
) -> SyntheticStructure:
    """The ``index``-th synthetic structure of ``split`` for ``seed`` (independent of others)."""
    rng = np.random.default_rng([seed, _stream(split), index])
    name = f"synthetic-{split}-{seed}-{index:06d}"
    return generate_structure(rng, min_length=min_length, max_length=max_length, name=name)


def generate_synthetic(
    n: int, *, seed: int, split: str = "train", min_length: int = 24, max_length: int = 64
) -> list[RNASample]:
    """``n`` synthetic samples (see the module docstring); deterministic in ``(seed, split)``.

    Examples
    --------
    >>> samples = generate_synthetic(2, seed=0, min_length=24, max_length=32)
    >>> [24 <= len(s) <= 32 for s in samples]
    [True, True]
    """
    lengths = {"min_length": min_length, "max_length": max_length}
    return [synthetic_structure(seed, i, split=split, **lengths).sample for i in range(n)]
