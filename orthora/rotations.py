"""Pure tensor functions: orthogonal block matrices from free parameters, and their application.

Conventions: a rotation acts on column vectors, ``y = R x``. A block-diagonal ``R`` with ``k`` blocks of size ``b`` is
stored as a ``(k, b, b)`` tensor and never materialised as a dense ``(k*b, k*b)`` matrix. Activations are stored as
rows ``(..., k*b)``, so applying ``R`` to them means ``y[..., i, :] = x[..., i, :] @ R[i].T`` for every block ``i``.

Everything here is a function of tensors only (no modules, no state), so it is easy to test with gradcheck and to
reuse from the layers, the merge path and the benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "Parametrization",
    "PARAMETRIZATIONS",
    "get_parametrization",
    "num_free_parameters",
    "skew_symmetric",
    "constrain_generator",
    "generator_norm_bound",
    "limit_generator",
    "cayley",
    "cayley_neumann",
    "exponential",
    "exp_frechet",
    "householder",
    "householder_factors",
    "householder_from_factors",
    "orthogonal_blocks",
    "orthogonal_factors",
    "identity_parameters",
    "rotate",
    "rotate_factored",
    "rotate_weight_rows",
    "rotate_weight_columns",
    "fold_into_weight",
    "folded_linear",
    "folding_is_cheaper",
    "factored_is_cheaper",
    "rotation_step_cost",
    "invert_blocks",
    "orthogonality_error",
]


def skew_symmetric(params: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(k, b(b-1)/2)`` free numbers -> ``(k, b, b)`` skew-symmetric generators ``A = U - U^T``."""
    rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=params.device)
    upper = params.new_zeros(params.shape[0], block_size, block_size)
    upper[:, rows, cols] = params
    return upper - upper.transpose(-1, -2)


def constrain_generator(generator: torch.Tensor, max_angle: float) -> torch.Tensor:
    """Scale each block's generator so its Frobenius norm is at most ``max_angle`` (smooth, differentiable).

    A generator of norm ``r`` moves ``R`` at most about ``r`` away from the identity, which is the constrained-OFT idea
    (COFT) without an in-place projection of the parameters.
    """
    norm = torch.linalg.matrix_norm(generator, keepdim=True)
    return generator * torch.clamp(max_angle / norm.clamp_min(1e-12), max=1.0)


def generator_norm_bound(generator: torch.Tensor) -> torch.Tensor:
    """``(k, 1, 1)`` upper bounds of each skew-symmetric block's spectral norm: its largest absolute row sum.

    ``||A||_2 <= sqrt(||A||_1 ||A||_inf)`` and ``||A||_1 = ||A||_inf`` for skew-symmetric ``A``. It costs ``O(b^2)``
    (no extra matrix product) and is exact for a rotation in disjoint planes.
    """
    return generator.abs().sum(dim=-1).amax(dim=-1)[:, None, None]


def limit_generator(generator: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale each block's generator so that :func:`generator_norm_bound` is at most ``radius`` (a no-op below it).

    The scale is differentiable, and its gradient is exactly zero below the radius, so an untouched generator (zero
    at initialisation included) trains exactly as without the limit.
    """
    bound = generator_norm_bound(generator)
    return generator * torch.clamp(radius / bound.clamp_min(1e-12), max=1.0)


def _eye_like(generator: torch.Tensor) -> torch.Tensor:
    return torch.eye(generator.shape[-1], dtype=generator.dtype, device=generator.device)


def cayley(generator: torch.Tensor) -> torch.Tensor:
    """Exact Cayley map ``R = (I + A)^-1 (I - A) = 2 (I + A)^-1 - I`` of skew-symmetric ``A``.

    ``(I + A)^-1 = (I - A)(I - A^2)^-1`` and ``I - A^2 = I + A^T A`` is symmetric positive definite (eigenvalues
    ``>= 1``), so the inverse comes from a Cholesky factorisation: about half the work of the LU a general solve
    needs, and it cannot fail. The backward needs no solve at all (see :class:`_CayleyMap`).
    """
    return _CayleyMap.apply(generator)


class _CayleyMap(torch.autograd.Function):
    """Cayley map whose backward is two batched products: with ``M = (I + A)^-1 = (R + I) / 2``,
    ``dR = 2 dM = -2 M dA M``, so ``dL/dA = -2 M^T G M^T`` (the skew projection is done by the caller's
    :func:`skew_symmetric` backward). Only ``R`` is saved."""

    @staticmethod
    def forward(ctx, generator: torch.Tensor) -> torch.Tensor:
        eye = _eye_like(generator)
        spd = eye - generator @ generator  # = I + A^T A
        # cholesky_ex: no error check, hence no host-device sync on GPU (I + A^T A is always positive definite)
        factor = torch.linalg.cholesky_ex(spd).L
        inverse = (eye - generator) @ torch.cholesky_inverse(factor)  # (I + A)^-1
        rotation = 2 * inverse - eye
        ctx.save_for_backward(rotation)
        return rotation

    @staticmethod
    def backward(ctx, grad_rotation: torch.Tensor) -> torch.Tensor:
        (rotation,) = ctx.saved_tensors
        with torch.autocast(device_type=rotation.device.type, enabled=False):
            inverse_t = (rotation + _eye_like(rotation)).transpose(-1, -2) / 2
            return -2 * (inverse_t @ grad_rotation.to(rotation.dtype) @ inverse_t)


def cayley_neumann(generator: torch.Tensor, terms: int) -> torch.Tensor:
    """The same Cayley map with ``(I + A)^-1`` replaced by its first ``terms`` Neumann terms ``sum_j (-A)^j``.

    It approximates the *same* rotation as :func:`cayley` (not its transpose), so switching a trained adapter between
    the two keeps its meaning. Orthogonal only up to ``O(||A||^terms)``, and only meaningful for ``||A||_2 < 1``:
    :func:`orthogonal_blocks` keeps the generator within :data:`NEUMANN_MAX_NORM` before calling it.
    """
    eye = _eye_like(generator)
    series = eye
    power = eye
    for _ in range(terms - 1):
        power = -power @ generator
        series = series + power
    return series @ (eye - generator)


def exponential(generator: torch.Tensor) -> torch.Tensor:
    """Exact exponential map ``R = exp(A)`` (a rotation in SO(b)); ``torch.linalg.matrix_exp`` forward, and a
    backward about three times cheaper than torch's (see :class:`_ExpMap`).

    2 x 2 blocks (plane rotations) use the closed form ``[[cos t, -sin t], [sin t, cos t]]``: torch's float32
    ``matrix_exp`` is off orthogonality by up to 3.6e-5 there (near 0.58 rad), above the exact maps' 1e-5.
    """
    if generator.shape[-1] == 2 and generator.shape[-2] == 2:
        return _plane_rotation(0.5 * (generator[..., 1, 0] - generator[..., 0, 1]))  # skew: both entries
    return _ExpMap.apply(generator)


def _plane_rotation(angle: torch.Tensor) -> torch.Tensor:
    """``exp([[0, -t], [t, 0]])`` for a batch of angles ``t``: shape ``(..., 2, 2)``."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([cos, -sin], dim=-1), torch.stack([sin, cos], dim=-1)], dim=-2)


#: (Taylor degree, Paterson-Stockmeyer chunk) per dtype for :func:`exp_frechet` on matrices of 1-norm <= 1: the
#: truncation error of the derivative is about 1/degree!, below the unit roundoff (12! ~ 5e8, 18! ~ 6e15).
_FRECHET_TAYLOR = {torch.float32: (12, 4), torch.float64: (18, 5)}


def _pair_product(x1, y1, x2, y2):
    """``[[x1, y1], [0, x1]] @ [[x2, y2], [0, x2]]`` as its two distinct blocks (three products, not eight)."""
    top = x1 @ torch.cat([x2, y2], dim=-1)
    size = x2.shape[-1]
    return top[..., :size], top[..., size:] + y1 @ x2


def exp_frechet(matrix: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Fréchet derivative ``L(A, E)`` of the matrix exponential: the top-right block of ``exp([[A, E], [0, A]])``.

    Scaling and squaring with a Taylor polynomial evaluated on the block-triangular pair, so every product of
    ``2b x 2b`` block-triangular matrices costs three ``b x b`` products instead of eight (what
    ``torch.linalg.matrix_exp``'s backward pays by exponentiating the dense ``2b x 2b`` matrix), and the
    polynomial is evaluated by Paterson-Stockmeyer (6 pair products for degree 12). ``L`` is linear in ``E``, so
    only ``A``'s norm sets the number of squarings.
    """
    degree, chunk = _FRECHET_TAYLOR[torch.float64 if matrix.dtype == torch.float64 else torch.float32]
    norm = matrix.abs().sum(dim=-2).amax().item() if matrix.numel() else 0.0  # largest 1-norm in the batch
    squarings = max(0, math.ceil(math.log2(norm))) if norm > 1 else 0
    x = matrix / 2**squarings
    y = direction / 2**squarings
    eye = _eye_like(matrix).expand_as(matrix)
    powers = [(eye, torch.zeros_like(y)), (x, y)]  # M^0 .. M^chunk as (block, derivative) pairs
    while len(powers) <= chunk:
        powers.append(_pair_product(*powers[-1], x, y))
    coefficients = [1.0 / math.factorial(j) for j in range(degree + 1)]

    def chunk_sum(start: int):
        terms = [(coefficients[start + i], powers[i]) for i in range(chunk) if start + i <= degree]
        return sum(c * p[0] for c, p in terms), sum(c * p[1] for c, p in terms)

    starts = list(range(0, degree + 1, chunk))
    result = chunk_sum(starts[-1])
    for start in reversed(starts[:-1]):
        product = _pair_product(*result, *powers[chunk])
        block = chunk_sum(start)
        result = (product[0] + block[0], product[1] + block[1])
    for _ in range(squarings):
        result = _pair_product(*result, *result)
    return result[1]


class _ExpMap(torch.autograd.Function):
    """``exp(A)`` with the backward ``dL/dA = L(A^T, G)`` from :func:`exp_frechet` (torch's uses a dense
    ``2b x 2b`` exponential, ~8x the forward's cost)."""

    @staticmethod
    def forward(ctx, generator: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(generator)
        return torch.linalg.matrix_exp(generator)

    @staticmethod
    def backward(ctx, grad_rotation: torch.Tensor) -> torch.Tensor:
        (generator,) = ctx.saved_tensors
        with torch.autocast(device_type=generator.device.type, enabled=False):
            return exp_frechet(generator.mT, grad_rotation.to(generator.dtype))


def householder(vectors: torch.Tensor) -> torch.Tensor:
    """``(k, r, b)`` vectors -> ``(k, b, b)`` products ``H(v_1) ... H(v_r)`` of reflections ``I - 2 u u^T``.

    Uses the compact "UT" form of a product of reflections (LAPACK's ``larft``):
    ``H(u_1)...H(u_r) = I - U S U^T`` with ``S^-1 = striu(U^T U) + I/2``, so the cost is three batched products and
    one triangular solve whatever ``r`` is, instead of ``r`` sequential updates.
    """
    return householder_from_factors(*householder_factors(vectors))


def householder_factors(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, r, b)`` vectors -> ``(U, C)``, both ``(k, r, b)``: unit vectors ``U`` and ``C = S U`` with
    ``H(u_1)...H(u_r) = I - U^T C`` (the compact UT form, see :func:`householder`)."""
    num_reflections = vectors.shape[1]
    units = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (k, r, b)
    gram = units @ units.mT  # (k, r, r)
    eye_r = torch.eye(num_reflections, dtype=vectors.dtype, device=vectors.device)
    s_inverse = (
        torch.triu(gram, diagonal=1) + 0.5 * eye_r
    )  # upper triangular, diagonal 1/2: always invertible
    coefficients = torch.linalg.solve_triangular(s_inverse, units, upper=True)  # S U^T: (k, r, b)
    return units, coefficients


def householder_from_factors(units: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """The dense ``(k, b, b)`` blocks ``I - U^T C`` of :func:`householder_factors`."""
    eye_b = torch.eye(units.shape[-1], dtype=units.dtype, device=units.device)
    return eye_b - units.mT @ coefficients


@dataclass(frozen=True)
class Parametrization:
    """Everything orthora knows about one map from free parameters to an orthogonal block, in one place.

    ``exact``: the block is orthogonal to working precision (transpose = inverse, memory-saving backward allowed).
    ``map_generator``: ``(skew generator, neumann_terms) -> blocks`` for the maps whose parameters are the strict
    upper triangle of a skew-symmetric generator (``max_angle`` applies to those); None for Householder, whose
    parameters are ``num_reflections`` reflection vectors per block.
    ``generator_gain``: how fast the block leaves the identity per unit of generator (``R ~ I + gain * A``).
    ``safe_radius``: the generator is scaled so that an upper bound of its spectral norm stays within this radius
    (see :func:`limit_generator`), where the map is accurate in float32 whatever an optimizer does to the parameters.
    """

    name: str
    exact: bool
    description: str
    map_generator: Callable[[torch.Tensor, int], torch.Tensor] | None = field(default=None, repr=False)
    safe_radius: float | None = None
    generator_gain: float = 1.0

    @property
    def uses_generator(self) -> bool:
        return self.map_generator is not None

    def num_params(self, block_size: int, num_reflections: int = 2) -> int:
        """Free parameters of one ``block_size`` x ``block_size`` block."""
        if self.uses_generator:
            return block_size * (block_size - 1) // 2
        return num_reflections * block_size

    def param_shape(self, num_blocks: int, block_size: int, num_reflections: int = 2) -> tuple[int, ...]:
        """Shape of the stored parameter tensor for ``num_blocks`` blocks."""
        if self.uses_generator:
            return (num_blocks, self.num_params(block_size))
        return (num_blocks, num_reflections, block_size)

    def identity_init(
        self,
        num_blocks: int,
        block_size: int,
        num_reflections: int = 2,
        generator: torch.Generator | None = None,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """Parameters whose blocks are exactly the identity.

        Skew maps: zeros. Householder: pairs of equal reflections (``H(v) H(v) = I``, so ``num_reflections`` must be
        even) with random directions, so the gradient is not degenerate at the start.
        """
        if self.uses_generator:
            return torch.zeros(self.param_shape(num_blocks, block_size))
        if num_reflections % 2:
            raise ValueError(
                f"num_reflections={num_reflections} is odd; the identity initialisation pairs equal reflections"
            )
        half = torch.randn(num_blocks, num_reflections // 2, block_size, generator=generator) / scale
        return half.repeat_interleave(2, dim=1)

    def random_init(
        self,
        num_blocks: int,
        block_size: int,
        num_reflections: int = 2,
        generator: torch.Generator | None = None,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """Parameters of random (non-identity) blocks, for tests: small generators, or random reflections."""
        shape = self.param_shape(num_blocks, block_size, num_reflections)
        noise = torch.randn(shape, generator=generator)
        return (0.1 * noise if self.uses_generator else noise) / scale

    def auto_scale(self, block_size: int) -> float:
        """The generator scale that makes one optimizer step the same rotation whatever the block size.

        Adam moves every free parameter by about the learning rate ``lr`` per step. A ``b x b`` skew generator has
        ``b(b-1)/2`` of them, so unscaled its RMS rotation angle per plane grows like ``lr * sqrt(b)``; scaling the
        generator by ``1/sqrt(b)`` makes it ``~lr`` radians for every ``b``. Householder vectors are normalised, and
        a step of ``lr`` per entry on a vector of norm ``~sqrt(b)`` already turns it by ``~lr`` whatever ``b``, and a
        pair of reflections turns its plane by about twice the angle between its two vectors.
        ``generator_gain`` corrects for maps that turn faster per step (Cayley: ``R ~ I - 2A``; Householder pairs).
        """
        if self.uses_generator:
            return 1.0 / (self.generator_gain * math.sqrt(block_size))
        return 1.0 / self.generator_gain

    def build(
        self,
        params: torch.Tensor,
        block_size: int,
        *,
        neumann_terms: int = 5,
        max_angle: float | None = None,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """Parameters -> ``(k, b, b)`` blocks, in the parameters' dtype (see :func:`orthogonal_blocks`).

        ``scale`` multiplies the skew generator (see :meth:`auto_scale`); Householder blocks do not depend on the
        length of their vectors, so for them the scale acts only through the initial parameters (divided by it).
        """
        if self.map_generator is None:
            return householder(params)
        generator = skew_symmetric(params, block_size)
        if scale != 1.0:
            generator = generator * scale
        if max_angle is not None:
            generator = constrain_generator(generator, max_angle)
        if self.safe_radius is not None:
            generator = limit_generator(generator, self.safe_radius)
        return self.map_generator(generator, neumann_terms)


#: Radius for the Cayley and exponential maps: float32 Cayley blocks lose orthogonality once ``I + A^T A`` is badly
#: conditioned (``||A||_2`` in the hundreds, reachable with a large learning rate), and the exponential's scaling and
#: squaring loses digits the same way. Within 10 both stay orthogonal to ~1e-5 in float32, and 10 still allows
#: Cayley rotations up to ``2 atan(10) = 169`` degrees in each plane (and any angle up to pi for ``exp``).
EXACT_MAX_NORM = 10.0
#: Radius for ``cayley_neumann``: its series ``sum_j (-A)^j`` diverges once ``||A||_2`` reaches 1 (NaN after a few
#: large steps). With ``||A||_2 <= rho`` the truncated map is ``R_n = (I - (-A)^n) R`` (``R`` the exact Cayley
#: rotation), so ``||R_n - R||_2 <= rho^n`` and ``max|R_n^T R_n - I| <= 2 rho^n + rho^(2n)``.
NEUMANN_MAX_NORM = 0.5

#: The single table of parametrizations; config validation, the layers and the benchmark read it.
PARAMETRIZATIONS: dict[str, Parametrization] = {
    spec.name: spec
    for spec in (
        Parametrization(
            "cayley", True, "exact, Cayley map by Cholesky", lambda a, _terms: cayley(a), EXACT_MAX_NORM, 2.0
        ),
        Parametrization(
            "cayley_neumann",
            False,
            "truncated Neumann series of the same Cayley map: faster, approximately orthogonal",
            cayley_neumann,
            NEUMANN_MAX_NORM,
            2.0,
        ),
        Parametrization(
            "exp", True, "exact, matrix exponential", lambda a, _terms: exponential(a), EXACT_MAX_NORM
        ),
        Parametrization("householder", True, "exact, product of reflections", generator_gain=2.5),
    )
}


def get_parametrization(name: str) -> Parametrization:
    """The table entry for ``name``, or a ValueError listing the valid names."""
    try:
        return PARAMETRIZATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown parametrization={name!r}; valid values are {', '.join(PARAMETRIZATIONS)}"
        ) from None


def num_free_parameters(parametrization: str, block_size: int, num_reflections: int = 2) -> int:
    """Free parameters of one ``block_size`` x ``block_size`` orthogonal block."""
    return get_parametrization(parametrization).num_params(block_size, num_reflections)


def orthogonal_blocks(
    params: torch.Tensor,
    parametrization: str,
    block_size: int,
    *,
    neumann_terms: int = 5,
    max_angle: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
) -> torch.Tensor:
    """Free parameters -> ``(k, b, b)`` orthogonal blocks, computed in ``compute_dtype`` (float32 by default).

    ``params`` is ``(k, b(b-1)/2)`` for the skew-based maps and ``(k, r, b)`` for ``householder``. Low-precision
    parameters are upcast first, so bf16/fp16 models still get rotations that are orthogonal to float32 precision.
    """
    spec = get_parametrization(parametrization)
    if compute_dtype not in (torch.float32, torch.float64):
        compute_dtype = torch.float32
    # an enclosing autocast would run the block products in bf16/fp16 and lose orthogonality: keep it off here
    with torch.autocast(device_type=params.device.type, enabled=False):
        return spec.build(
            params.to(compute_dtype),
            block_size,
            neumann_terms=neumann_terms,
            max_angle=max_angle,
            scale=scale,
        )


def orthogonal_factors(
    params: torch.Tensor, compute_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Householder vectors ``(k, r, b)`` -> the factors ``(U, C)`` of :func:`householder_factors`, computed like
    :func:`orthogonal_blocks` (upcast to float32 or float64, autocast off)."""
    if compute_dtype not in (torch.float32, torch.float64):
        compute_dtype = torch.float32
    with torch.autocast(device_type=params.device.type, enabled=False):
        return householder_factors(params.to(compute_dtype))


def identity_parameters(
    parametrization: str,
    num_blocks: int,
    block_size: int,
    num_reflections: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Parameters whose rotation is exactly the identity (see :meth:`Parametrization.identity_init`)."""
    return get_parametrization(parametrization).identity_init(
        num_blocks, block_size, num_reflections, generator
    )


def _rotate_rows(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., k*b)`` -> each block row-vector multiplied by ``R_i^T`` (i.e. ``R_i`` applied to it)."""
    num_blocks, block_size, _ = blocks.shape
    lead = x.shape[:-1]
    if num_blocks == 1:  # shared or single block: one GEMM over all (token, group) rows, no copies
        return (x.reshape(-1, block_size) @ blocks[0].mT).reshape(*lead, -1)
    # einsum lets torch pick the batched-GEMM layout; measured faster than bmm on a transposed view on CPU
    out = torch.einsum("nkb,kcb->nkc", x.reshape(-1, num_blocks, block_size), blocks)
    return out.reshape(*lead, num_blocks * block_size)


class _RotateKeepOutput(torch.autograd.Function):
    """``y = R x`` blockwise, saving ``y`` instead of ``x`` for the backward pass.

    Because ``R`` is orthogonal, ``x = R^T y``, so the gradient of ``R`` is ``(sum g^T y) R`` and ``x`` is never
    needed. ``y`` is usually kept alive anyway by the next operation (a linear layer, an activation), so the
    rotation adds no activation memory of its own, and the backward costs two block products like plain autograd.
    Only valid for exactly orthogonal ``R``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        y = _rotate_rows(x, blocks)
        ctx.save_for_backward(y, blocks)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        y, blocks = ctx.saved_tensors
        # under autocast the forward product (so y and grad_y) may be bf16/fp16 while the blocks are float32, and
        # backward runs outside autocast: rotate the gradient in its own dtype, accumulate dR in the blocks' dtype
        blocks_t = blocks.mT.to(grad_y.dtype)
        grad_x = _rotate_rows(grad_y, blocks_t) if ctx.needs_input_grad[0] else None
        grad_blocks = None
        if ctx.needs_input_grad[1]:
            num_blocks, block_size, _ = blocks.shape
            g = grad_y.reshape(-1, num_blocks, block_size).to(blocks.dtype)
            yr = y.reshape(-1, num_blocks, block_size).to(blocks.dtype)
            # dL/dR_i = sum_n g_i^T x_i with x_i = y_i R_i, i.e. (sum_n g_i^T y_i) R_i: no need to recompute x
            grad_blocks = torch.bmm(torch.einsum("nkc,nkb->kcb", g, yr), blocks)
        return grad_x, grad_blocks


def rotate(x: torch.Tensor, blocks: torch.Tensor, *, exact: bool = True) -> torch.Tensor:
    """Apply block-diagonal ``R`` (``(k, b, b)``, or ``(1, b, b)`` shared by all blocks) to the last dim of ``x``.

    ``blocks`` is cast to ``x``'s dtype. With ``exact=True`` (``R`` orthogonal to working precision) the
    memory-saving backward of :class:`_RotateKeepOutput` is used whenever gradients are needed.
    """
    blocks = blocks.to(x.dtype)
    num_blocks, block_size, _ = blocks.shape
    _check_width(x.shape[-1], num_blocks, block_size)
    if exact and torch.is_grad_enabled() and (x.requires_grad or blocks.requires_grad):
        return _RotateKeepOutput.apply(x, blocks)
    return _rotate_rows(x, blocks)


def _check_width(width: int, num_blocks: int, block_size: int) -> None:
    # a single (shared) block acts on every consecutive group of block_size features
    if width % block_size or (num_blocks > 1 and num_blocks * block_size != width):
        raise ValueError(
            f"rotation of width {num_blocks}x{block_size} cannot act on features of width {width}"
        )


class _RotateFactored(torch.autograd.Function):
    """``y = R x`` blockwise with ``R = I - U^T C`` kept factored (``U``, ``C``: ``(k, r, b)``), saving ``y``.

    Per block and ``N`` tokens the forward costs ``2·N·b·r`` instead of ``N·b²``: ``y = x - (x C^T) U``. The backward
    uses ``x = y R`` (``R`` orthogonal) inside low-rank products only, never forming ``x`` or ``R``:
    ``dx = g - (g U^T) C``, ``dU = -P^T g`` with ``P = x C^T = y C^T - (y U^T)(C C^T)``, and
    ``dC = -(g U^T)^T x = -((g U^T)^T y - ((g U^T)^T (y U^T)) C)``: six ``N·b·r`` products, so ``8·N·b·r`` per step
    against ``3·N·b²`` for the dense block.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, units: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        num_blocks, _, block_size = units.shape
        rows = x.reshape(-1, num_blocks, block_size)
        u, c = units.to(x.dtype), coefficients.to(x.dtype)
        projected = torch.einsum("nkb,krb->nkr", rows, c)
        y = (rows - torch.einsum("nkr,krb->nkb", projected, u)).reshape(x.shape)
        ctx.save_for_backward(y, units, coefficients)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        y, units, coefficients = ctx.saved_tensors
        num_blocks, _, block_size = units.shape
        g = grad_y.reshape(-1, num_blocks, block_size)
        grad_x = grad_units = grad_coefficients = None
        if ctx.needs_input_grad[0]:
            g_u = torch.einsum("nkb,krb->nkr", g, units.to(g.dtype))
            grad_x = (g - torch.einsum("nkr,krb->nkb", g_u, coefficients.to(g.dtype))).reshape(grad_y.shape)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            work = (
                units.dtype
            )  # parameter gradients accumulate in the factors' dtype (float32 under autocast)
            g, rows = g.to(work), y.reshape(-1, num_blocks, block_size).to(work)
            g_u = torch.einsum("nkb,krb->nkr", g, units)
            y_u = torch.einsum("nkb,krb->nkr", rows, units)
            if ctx.needs_input_grad[1]:
                c_ct = coefficients @ coefficients.mT  # (k, r, r)
                projected = torch.einsum("nkb,krb->nkr", rows, coefficients) - torch.einsum(
                    "nkr,krs->nks", y_u, c_ct
                )
                grad_units = -torch.einsum("nkr,nkb->krb", projected, g)
            if ctx.needs_input_grad[2]:
                g_u_y = torch.einsum("nkr,nkb->krb", g_u, rows)
                g_u_y_u = torch.einsum("nkr,nks->krs", g_u, y_u)
                grad_coefficients = -(g_u_y - g_u_y_u @ coefficients)
        return grad_x, grad_units, grad_coefficients


def rotate_factored(x: torch.Tensor, units: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Apply the Householder blocks ``I - U^T C`` (:func:`householder_factors`; ``(k, r, b)`` or ``(1, r, b)``
    shared) to the last dim of ``x`` without forming them: the same result and gradients as
    ``rotate(x, householder_from_factors(U, C))`` for ``2·N·d·r`` instead of ``N·d·b`` multiply-adds."""
    num_blocks, _, block_size = units.shape
    _check_width(x.shape[-1], num_blocks, block_size)
    if torch.is_grad_enabled() and (x.requires_grad or units.requires_grad or coefficients.requires_grad):
        return _RotateFactored.apply(x, units, coefficients)
    rows = x.reshape(-1, num_blocks, block_size)
    u, c = units.to(x.dtype), coefficients.to(x.dtype)
    return (rows - torch.einsum("nkr,krb->nkb", torch.einsum("nkb,krb->nkr", rows, c), u)).reshape(x.shape)


def _expand_shared(blocks: torch.Tensor, width: int) -> torch.Tensor:
    num_blocks, block_size, _ = blocks.shape
    if num_blocks * block_size == width:
        return blocks
    return blocks.expand(width // block_size, -1, -1)


def rotate_weight_rows(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``blockdiag(R) @ W`` for ``W`` of shape ``(d_out, ...)``: the merged weight of an output-side rotation."""
    d_out = weight.shape[0]
    blocks = _expand_shared(blocks, d_out).to(weight.dtype)
    num_blocks, block_size, _ = blocks.shape
    w = weight.reshape(num_blocks, block_size, -1)
    return torch.bmm(blocks, w).reshape(weight.shape)


def rotate_weight_columns(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``W @ blockdiag(R)`` for ``W`` of shape ``(d_out, d_in)``: the merged weight of an input-side rotation."""
    d_out, d_in = weight.shape
    blocks = _expand_shared(blocks, d_in).to(weight.dtype)
    num_blocks, block_size, _ = blocks.shape
    w = weight.reshape(d_out, num_blocks, block_size).transpose(0, 1)  # (k, d_out, b)
    return torch.bmm(w, blocks).transpose(0, 1).reshape(d_out, d_in)


def fold_into_weight(
    weight: torch.Tensor, out_blocks: torch.Tensor | None, in_blocks: torch.Tensor | None
) -> torch.Tensor:
    """``blockdiag(R_out) @ W @ blockdiag(R_in)`` for ``W`` of shape ``(d_out, d_in)`` (either side may be None)."""
    if in_blocks is not None:
        weight = rotate_weight_columns(weight, in_blocks)
    if out_blocks is not None:
        weight = rotate_weight_rows(weight, out_blocks)
    return weight


def _block_outer(a: torch.Tensor, b: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``sum_n a_i[n]^T b_i[n]`` per block ``i`` (``(k, b, b)``, in the blocks' dtype)."""
    num_blocks, block_size, _ = blocks.shape
    a = a.reshape(-1, num_blocks, block_size)
    b = b.reshape(-1, num_blocks, block_size)
    return torch.einsum("nkc,nkb->kcb", a, b).to(blocks.dtype)


def _fold_dtype(out_blocks: torch.Tensor | None, in_blocks: torch.Tensor | None) -> torch.dtype:
    blocks = out_blocks if out_blocks is not None else in_blocks
    return torch.float64 if blocks.dtype == torch.float64 else torch.float32


class _FoldedLinear(torch.autograd.Function):
    """``z = x (R_out W R_in)^T + R_out b`` with the rotations folded into the frozen weight.

    Folding costs ``d_out·d_in·b`` once per call instead of ``N·d·b`` per rotated activation, and with orthogonal
    blocks the backward needs neither the pre-rotation activations nor a gradient of ``W``:
    ``dR_out = (sum g^T z) R_out`` and ``dR_in = R_in (sum dx^T x)``. The folded weight is recomputed in backward
    instead of being stored, so memory is the output (output side) and the input (input side), as for LoRA.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, out_blocks, in_blocks, compute_dtype):
        work = _fold_dtype(out_blocks, in_blocks)
        with torch.no_grad():
            folded = fold_into_weight(weight.to(work), out_blocks, in_blocks).to(compute_dtype)
            folded_bias = None
            if bias is not None:
                folded_bias = (
                    bias.to(work) if out_blocks is None else rotate(bias.to(work), out_blocks, exact=False)
                )
                folded_bias = folded_bias.to(compute_dtype)
        z = torch.nn.functional.linear(x.to(compute_dtype), folded, folded_bias)
        ctx.save_for_backward(
            x if in_blocks is not None else None,
            weight,
            z if out_blocks is not None else None,
            out_blocks,
            in_blocks,
        )
        ctx.compute_dtype = compute_dtype
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z):
        x, weight, z, out_blocks, in_blocks = ctx.saved_tensors
        grad_z = grad_z.to(ctx.compute_dtype)
        grad_x = grad_bias = grad_out = grad_in = None
        needs_x, _, needs_bias, needs_out, needs_in, _ = ctx.needs_input_grad
        work = _fold_dtype(out_blocks, in_blocks)
        if needs_x or needs_in:
            folded = fold_into_weight(weight.to(work), out_blocks, in_blocks).to(ctx.compute_dtype)
            grad_x = grad_z @ folded
        if needs_out:
            grad_out = torch.bmm(_block_outer(grad_z, z, out_blocks), out_blocks)
        if needs_in:
            grad_in = torch.bmm(in_blocks, _block_outer(grad_x, x.to(ctx.compute_dtype), in_blocks))
        if needs_bias and ctx.bias_dtype is not None:
            summed = grad_z.reshape(-1, grad_z.shape[-1]).to(work).sum(0)
            grad_bias = summed if out_blocks is None else rotate(summed, out_blocks.mT, exact=False)
            grad_bias = grad_bias.to(ctx.bias_dtype)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype) if needs_x else None
        return grad_x, None, grad_bias, grad_out, grad_in, None


def folded_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_blocks: torch.Tensor | None,
    in_blocks: torch.Tensor | None,
) -> torch.Tensor:
    """A frozen linear layer (``weight`` ``(d_out, d_in)``) with exact block rotations on either or both sides.

    Same result as ``rotate(linear(rotate(x, in_blocks), W, b), out_blocks)``, computed by folding the rotations
    into the weight (see :class:`_FoldedLinear`). Autocast is honoured: the matmul runs in the autocast dtype.
    Only valid for exactly orthogonal blocks and a weight that is not trained.
    """
    device_type = x.device.type
    compute_dtype = x.dtype
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    elif weight.dtype != x.dtype:
        compute_dtype = weight.dtype
    with torch.autocast(device_type=device_type, enabled=False):
        return _FoldedLinear.apply(x, weight, bias, out_blocks, in_blocks, compute_dtype)


#: Extra cost per activation of the factored path, in multiply-add equivalents: it makes about nine more passes
#: over the activations than the dense one (six small-rank products instead of two block products), which on CPU
#: costs as much as ~192 multiply-adds per element. Fitted to `python -m orthora.bench --profile micro` and an r/b
#: grid (2026-11-30, 1 thread): factored is faster at b = 128 for r <= 16 and at b = 256 for r <= 32, slower at
#: b <= 64 whatever r.
FACTORED_PASS_OVERHEAD = 192


def factored_is_cheaper(block_size: int, num_reflections: int) -> bool:
    """Whether rotating activations with the factors of ``num_reflections`` Householder reflections
    (:class:`_RotateFactored`: ``8·N·b·r`` multiply-adds per training step plus its extra passes,
    :data:`FACTORED_PASS_OVERHEAD`) beats the dense block (``3·N·b²``: forward, input and block gradients).
    The token count cancels, so it is a property of the adapter."""
    return 8 * num_reflections + FACTORED_PASS_OVERHEAD < 3 * block_size


def rotation_step_cost(
    num_tokens: int, width: int, block_size: int, num_reflections: int | None = None
) -> int:
    """Cost per training step of rotating ``num_tokens`` activations of ``width`` features, in multiply-adds:
    ``3·N·d·b`` with dense blocks, ``N·d·(8r + overhead)`` with factored Householder blocks (``num_reflections=r``)
    where :func:`factored_is_cheaper`."""
    if num_reflections is not None and factored_is_cheaper(block_size, num_reflections):
        return num_tokens * width * (8 * num_reflections + FACTORED_PASS_OVERHEAD)
    return 3 * num_tokens * width * block_size


def folding_is_cheaper(
    num_tokens: int,
    d_in: int,
    d_out: int,
    out_block: int | None,
    in_block: int | None,
    out_reflections: int | None = None,
    in_reflections: int | None = None,
) -> bool:
    """Whether folding into the weight beats rotating activations, per training step.

    Folding costs ``2·d_out·d_in·b`` (the fold, in forward and again in backward) plus ``N·d·b`` (the block
    gradient) per rotated side; rotating costs :func:`rotation_step_cost` per side (``*_reflections``: Householder
    rotations that may be applied factored). With dense output-side rotations alone this is simply ``N > d_in``.
    """
    sides = [
        (d, b, r) for d, b, r in ((d_out, out_block, out_reflections), (d_in, in_block, in_reflections)) if b
    ]
    rotating = sum(rotation_step_cost(num_tokens, d, b, r) for d, b, r in sides)
    folding = sum(2 * d_out * d_in * b + num_tokens * d * b for d, b, _ in sides)
    return rotating > folding


def invert_blocks(blocks: torch.Tensor, exact: bool) -> torch.Tensor:
    """Inverse of each block: the transpose when exactly orthogonal, a linear solve otherwise."""
    if exact:
        return blocks.mT
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device).expand_as(blocks)
    return torch.linalg.solve(blocks, eye)


def orthogonality_error(blocks: torch.Tensor) -> torch.Tensor:
    """``max |R^T R - I|`` over all blocks (0 for a perfect rotation)."""
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return (blocks.mT @ blocks - eye).abs().max()
