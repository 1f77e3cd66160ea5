"""Label schemes: map MIT-BIH beat symbols to integer class codes.

Class codes are fixed by the order of ``LabelScheme.classes`` and never depend on
the order in which symbols appear in the data (the seed notebook's fault).

``aami``  (ANSI/AAMI EC57 classes, codes 0..4)::

    0 N  <- N L R e j   (and B, other databases' bundle-branch-block beats)
    1 S  <- A a J S     (and n, supraventricular escape)
    2 V  <- V E         (and r, R-on-T premature ventricular contraction)
    3 F  <- F
    4 Q  <- / f Q       (and ?, unclassifiable)

``raw`` (each MIT-BIH beat symbol, codes 0..14)::

    N L R e j A a J S V E F / f Q
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Every annotation symbol that marks a heartbeat in PhysioNet beat-annotated databases.
# `!` (ventricular flutter wave) is deliberately absent: EC57 excludes it from scoring.
BEAT_SYMBOLS: frozenset[str] = frozenset("NLRBAaJSVrFejnE/fQ?")

AAMI_GROUPS: dict[str, str] = {
    "N": "NLRejB",
    "S": "AaJSn",
    "V": "VEr",
    "F": "F",
    "Q": "/fQ?",
}

RAW_CLASSES: tuple[str, ...] = ("N", "L", "R", "e", "j", "A", "a", "J", "S", "V", "E", "F", "/", "f", "Q")

# Records whose rhythm is paced; EC57 practice leaves them out of AAMI evaluations.
PACED_RECORDS: frozenset[str] = frozenset({"102", "104", "107", "217"})


@dataclass(frozen=True)
class LabelScheme:
    """A fixed mapping from beat symbols to class codes ``0 .. len(classes) - 1``."""

    name: str
    classes: tuple[str, ...]
    symbol_to_class: dict[str, str]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def code_of(self, symbol: str) -> int:
        """Class code of one beat symbol; ``-1`` when the scheme has no class for it."""
        cls = self.symbol_to_class.get(symbol)
        return -1 if cls is None else self.classes.index(cls)

    def encode(self, symbols: np.ndarray) -> np.ndarray:
        """Codes for an array of symbols, shape ``(n,)`` -> ``(n,)`` int16, ``-1`` where unmapped."""
        table = {s: self.code_of(s) for s in set(symbols.tolist())}
        return np.fromiter((table[s] for s in symbols.tolist()), dtype=np.int16, count=len(symbols))


AAMI = LabelScheme(
    name="aami",
    classes=tuple(AAMI_GROUPS),
    symbol_to_class={sym: cls for cls, syms in AAMI_GROUPS.items() for sym in syms},
)
RAW = LabelScheme(name="raw", classes=RAW_CLASSES, symbol_to_class={s: s for s in RAW_CLASSES})

SCHEMES: dict[str, LabelScheme] = {"aami": AAMI, "raw": RAW}


def get_scheme(name: str) -> LabelScheme:
    """The label scheme called ``name`` (``'aami'`` or ``'raw'``)."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"label_scheme must be one of {sorted(SCHEMES)}, got {name!r}") from None


def to_aami(symbols: np.ndarray) -> np.ndarray:
    """AAMI class letters for beat symbols, shape ``(n,)``; ``''`` where a symbol has no AAMI class."""
    return np.array([AAMI.symbol_to_class.get(s, "") for s in symbols.tolist()], dtype=object)
