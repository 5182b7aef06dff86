"""The run configuration: one frozen, validated dataclass built by the CLI and stamped into every
checkpoint and ``summary.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from numba_recon.checks import finite_above, finite_at_least
from numba_recon.errors import InputError
from numba_recon.symmetry.names import parse_symmetry_name

# This module is the data model: it depends on nothing above it (not the loss, symmetry operators
# or engine), so the accepted names of the settings live here and those modules import them.

#: Solvers ``run`` offers.
OPTIMIZERS = ("cg", "adam")
#: Where particles are prepared (``--prepare-on``).
PREPARE_ON = ("auto", "host", "device")
#: Seeds are stored as signed 64-bit integers (checkpoints, summaries).
MAX_SEED = 2**63 - 1
#: Per-particle losses (:mod:`numba_recon.loss`), and the other names each is known by.
LOSSES = ("l2", "trimmed", "reweighted")
LOSS_ALIASES = {"sorted": "trimmed"}
#: Every name ``--loss`` accepts, each loss followed by its aliases.
LOSS_NAMES = tuple(n for loss in LOSSES for n in (loss, *(a for a, c in LOSS_ALIASES.items() if c == loss)))


def canonical_loss(name: str) -> str:
    """Normalise a loss name (``sorted`` is an alias of ``trimmed``)."""
    key = name.strip().lower()
    key = LOSS_ALIASES.get(key, key)
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of l2, trimmed (sorted), reweighted")
    return key


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a reconstruction.

    Attributes
    ----------
    particles
        Input ``.star`` or ``.thu`` file.
    out_dir
        Output folder.
    optimizer
        ``cg`` (default: the one-pass direct reconstruction refined by preconditioned conjugate
        gradients, :mod:`numba_recon.objective`) or ``adam`` (minibatch Adam).
    epochs
        Passes over each half set; with ``cg`` the most passes (the run stops earlier when the
        cross-validation loss stops improving), ``1`` gives the direct reconstruction alone.
        None: 8 for ``cg``, 20 for ``adam``.
    batch_size
        Global minibatch size per half (summed over ranks); with ``cg``, the particles prepared
        and processed together within a pass.
    lr
        Adam step size relative to the scale of the map (see ``docs/reconstruction.md``).
    reg_lambda
        ``adam``: ``lambda`` of the regulariser ``n lambda^2 ||x||^2`` (n = training particles of
        the half), relative to the data scale (None: 0.01). ``cg``: an optional fixed ridge
        ``lambda^2 <K>`` added to the learned prior (None: 0).
    particle_diameter
        Particle diameter in Angstrom: the support prior (a soft-edged sphere) of the ``cg``
        solver; None estimates it from the data.
    drop_duplicates
        Keep the first row of each image when rows repeat an image (otherwise such input is refused).
    precondition
        ``adam``: precondition every minibatch gradient with the Fourier model of the normal
        operator (one extra pass builds it); ``cg`` always preconditions.
    early_stop
        ``cg``: stop when the held-out loss stops improving (otherwise run all ``epochs``; the maps
        with the lowest held-out loss are kept either way).
    backend
        ``cpu``, ``cuda`` or ``auto``.
    seed
        Seeds the half split (when the input has none), the cross-validation hold-out and the
        minibatch order.
    angpix, root, class_number
        Input options (see ``numba-recon run --help``).
    cv_fraction
        Fraction of each half held out for the cross-validation loss.
    checkpoint_every
        Write a checkpoint every this many epochs (and always at the end).
    keep_checkpoints
        Checkpoints kept once the run has finished (the newest; two are kept while it runs).
    initial_map
        ``adam``: optional MRC to start both halves from, low-passed at ``initial_lowpass``.
    initial_lowpass
        Resolution in Angstrom at which the start map is low-passed (RELION's ``--ini_high``):
        both halves start from the same map, so whatever detail it carries is common to them and
        would show up in the FSC. Default 60.
    loss, keep_start, keep_end, robust_warmup, reweight_power
        Robust loss settings (see :mod:`numba_recon.loss`); ``keep_start = keep_end = None`` is the
        automatic kept fraction.
    symmetry
        Point group (``C1``, ``Cn``, ``Dn``, ``T``, ``O``, ``I1``..``I4``).
    mask
        Optional mask for post-processing at the end of the run.
    truth
        Optional map of the truth (simulated data) for the report's map-vs-truth FSC.
    radius_px
        Support radius of the map in pixels (None: ``N // 2 - 1``).
    cache_mb
        Memory for particles kept between passes (prepared rows, or rows as read when they are
        prepared on the device); beyond it they are read (and prepared) again at every use.
    prepare_on
        ``"host"``: particles get their CTF and shift in numpy on the host (in a background
        thread); ``"device"``: the backend's ``prepare_particles`` does it where the operator runs;
        ``"auto"``: device for the CUDA backend, host for the CPU.
    """

    particles: str
    out_dir: str
    epochs: int | None = None
    batch_size: int = 256
    lr: float = 0.2
    reg_lambda: float | None = None
    optimizer: str = "cg"
    particle_diameter: float | None = None
    early_stop: bool = True
    precondition: bool = False
    drop_duplicates: bool = False
    backend: str = "auto"
    seed: int = 0
    angpix: float | None = None
    root: str | None = None
    class_number: int | None = None
    cv_fraction: float = 0.05
    checkpoint_every: int = 1
    keep_checkpoints: int = 1
    initial_map: str | None = None
    initial_lowpass: float = 60.0
    loss: str = "l2"
    keep_start: float | None = None
    keep_end: float | None = None
    robust_warmup: int = 2
    reweight_power: float = 1.0
    symmetry: str = "C1"
    mask: str | None = None
    truth: str | None = None
    radius_px: float | None = None
    cache_mb: float = 2048.0
    prepare_on: str = "auto"

    def __post_init__(self) -> None:
        def bad(option: str, problem: str, fix: str) -> InputError:
            return InputError(f"{option} {problem}", None, fix)

        if self.optimizer not in OPTIMIZERS:
            raise bad("--optimizer", f"must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})",
                      "cg is the default")
        if self.epochs is None:
            object.__setattr__(self, "epochs", 8 if self.optimizer == "cg" else 20)
        if self.reg_lambda is None:
            object.__setattr__(self, "reg_lambda", 0.0 if self.optimizer == "cg" else 0.01)
        if self.particle_diameter is not None and not finite_above(self.particle_diameter):
            raise bad("--particle-diameter", f"must be a finite positive number of Angstrom "
                      f"(got {self.particle_diameter})", "omit it to estimate the diameter from the data")
        if not 0 <= self.seed <= MAX_SEED:
            raise bad("--seed", f"must be an integer from 0 to {MAX_SEED} (got {self.seed})", "e.g. --seed 0")
        if not finite_above(self.initial_lowpass):
            raise bad("--initial-lowpass", f"must be a finite positive resolution in Angstrom (got "
                      f"{self.initial_lowpass})", "the default 60 suits most start maps")
        if self.epochs <= 0:
            raise bad("--epochs", f"must be positive (got {self.epochs})", "give at least 1")
        if self.batch_size <= 0:
            raise bad("--batch-size", f"must be positive (got {self.batch_size})", "give at least 1")
        # Every float check is written as ``not (finite and in range)``: NaN compares False with
        # everything and infinity passes ``> 0``, so a plain ``value <= 0`` would let both through.
        if not finite_above(self.lr):
            raise bad("--lr", f"must be a finite positive number (got {self.lr})", "the default 0.2 suits most data")
        if not finite_at_least(self.reg_lambda):
            raise bad("--reg-lambda", f"must be a finite number >= 0 (got {self.reg_lambda})",
                      "use 0 for no regulariser, or e.g. 0.01")
        if not 0 <= self.cv_fraction < 0.5:
            raise bad("--cv-fraction", f"must be in [0, 0.5) (got {self.cv_fraction})", "the default is 0.05")
        if self.keep_checkpoints <= 0:
            raise bad("--keep-checkpoints", f"must be positive (got {self.keep_checkpoints})",
                      "keep at least the newest (1), which --resume needs to go on with more --epochs")
        if self.checkpoint_every <= 0:
            raise bad("--checkpoint-every", f"must be positive (got {self.checkpoint_every})", "give at least 1")
        if (self.keep_start is None) != (self.keep_end is None):
            raise bad("--keep-fraction", "needs both START and END", "e.g. --keep-fraction 0.5:0.8, or auto")
        for name, v in (("start", self.keep_start), ("end", self.keep_end)):
            if v is not None and not 0 < v <= 1:
                raise bad("--keep-fraction", f"{name} must be in (0, 1] (got {v})", "e.g. --keep-fraction 0.5:0.8")
        if self.robust_warmup < 0:
            raise bad("--robust-warmup", f"must be >= 0 (got {self.robust_warmup})", "e.g. 2")
        if not finite_above(self.reweight_power):
            raise bad("--reweight-power", f"must be a finite positive number (got {self.reweight_power})",
                      "e.g. 0.5 or 1")
        if self.radius_px is not None and not finite_above(self.radius_px):
            raise bad("--radius", f"must be a finite positive number of pixels (got {self.radius_px})",
                      "omit it for N//2 - 1")
        if not finite_at_least(self.cache_mb):
            raise bad("--cache-mb", f"must be a finite number >= 0 (got {self.cache_mb})",
                      "give the memory in MB, or 0 to disable caching")
        if self.prepare_on not in PREPARE_ON:
            raise bad("--prepare-on", f"must be one of {', '.join(PREPARE_ON)} (got {self.prepare_on!r})",
                      "auto picks the device for --backend cuda")
        if self.angpix is not None and not finite_above(self.angpix):
            raise bad("--angpix", f"must be a finite positive number (got {self.angpix})",
                      "give the pixel size in Angstrom")
        try:
            object.__setattr__(self, "loss", canonical_loss(self.loss))
        except ValueError as err:
            raise bad("--loss", str(err), "choose l2, trimmed or reweighted") from None
        parse_symmetry_name(self.symmetry)  # raises InputError for an unknown group; the name is kept as given

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
