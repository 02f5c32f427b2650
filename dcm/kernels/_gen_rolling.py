"""Generator of :mod:`dcm.kernels.generated` (run ``python -m dcm.kernels._gen_rolling``).

The rolling-row depthwise kernels keep every tap weight, every shifted input row and every
accumulator in named registers, which Triton can only express as explicit code; this script writes
that code for kernels up to 5×5 and up to three kernel sets per launch into
``dcm/kernels/generated/dynconv_rolling.py``, and the package's ``__init__.py``: every file of that
folder is its output (marked ``linguist-generated`` in ``.gitattributes``;
``tests/test_generated_code.py`` checks that they are current). Not imported at run time.
"""
from pathlib import Path

R = range(-2, 3)
NK = 3
MAXROWS = 4  # forward / dx: input rows loaded per loop step (constexpr ROWS, 1 to MAXROWS)


def n(v: int) -> str:
    return f"m{-v}" if v < 0 else f"p{v}"


def guard(k, d, dw):
    return f"_U{k}_{n(d)}_{n(dw)}"


def header(name, args, rows=False):
    cx = ", ".join(f"KH{k}: tl.constexpr, KW{k}: tl.constexpr" for k in range(NK))
    return [
        "@triton.jit",
        f"def {name}(",
        f"    {args},",
        f"    NOUT: tl.constexpr, {cx},",
        "    BW: tl.constexpr, ROWS: tl.constexpr," if rows else "    BW: tl.constexpr,",
        "):",
        "    plane = tl.program_id(0).to(tl.int64)",
        "    split = tl.program_id(1)",
        "    ww = tl.program_id(2) * BW + tl.arange(0, BW)",
        "    HW = H * W",
        "    wv = ww < W",
    ]


def guards():
    out = []
    for k in range(NK):
        for d in R:
            for dw in R:
                cond = f"(NOUT > {k}) & ({d * d} <= (KH{k} // 2) * (KH{k} // 2)) & ({dw * dw} <= (KW{k} // 2) * (KW{k} // 2))"
                out.append(f"    {guard(k, d, dw)} = {cond}")
    return out


def weights():
    out = []
    for k in range(NK):
        for d in R:
            for dw in R:
                g = guard(k, d, dw)
                out.append(f"    if {g}:")
                out.append(
                    f"        w{k}_{n(d)}_{n(dw)} = tl.load(w{k}_ptr + plane * (KH{k} * KW{k}) + (({d} + KH{k} // 2) * KW{k} + {dw} + KW{k} // 2)).to(tl.float32)"
                )
                out.append("    else:")
                out.append(f"        w{k}_{n(d)}_{n(dw)} = 0.0")
    return out


def colmasks(sign=1):
    return [f"    c_{n(dw)} = wv & (ww + {sign * dw} >= 0) & (ww + {sign * dw} < W)" for dw in R]


def row_steps(L):
    """The ``ROWS`` rows of one loop step: appends the ``if ROWS > u:`` guard of row ``u > 0`` to ``L``
    and yields ``(u, indent)`` for the lines of that row."""
    for u in range(MAXROWS):
        if u:
            L.append(f"        if ROWS > {u}:")
        yield u, "        " + "    " * (u > 0)


def row_index(u, ind):
    """Row ``hb + u`` of the step as a vector (``hv{u}``) and whether it is inside the plane (``rv{u}``)."""
    return [f"{ind}hv{u} = ww * 0 + (hb + {u})", f"{ind}rv{u} = (hv{u} >= 0) & (hv{u} < H)"]


def roll(acc, ind):
    """Shift the five partial output rows ``{acc}_m2 .. {acc}_p2`` by one row (``m2`` was just stored)."""
    names = [f"{acc}_{n(e)}" for e in R]
    return [f"{ind}{a} = {b}" for a, b in zip(names, names[1:])] + [f"{ind}{names[-1]} = tl.zeros([BW], dtype=tl.float32)"]


def fwd():
    L = header("_dw_fwd_roll", "x_ptr, w0_ptr, w1_ptr, w2_ptr, o0_ptr, o1_ptr, o2_ptr, H, W, RCHUNK", rows=True)
    L += guards() + weights() + colmasks()
    for k in range(NK):
        for e in R:
            L.append(f"    a{k}_{n(e)} = tl.zeros([BW], dtype=tl.float32)")
    L += [
        "    h0 = split * RCHUNK",
        "    h1 = tl.minimum(h0 + RCHUNK, H)",
        "    xb = x_ptr + plane * HW",
        "    for hb in range(h0 - 2, h1 + 2, ROWS):",
    ]
    # all ROWS input rows are loaded before any output row is stored (the loads cannot be moved
    # past the stores by the compiler: the pointers may alias), so ROWS row loads are in flight
    for u, ind in row_steps(L):
        L += row_index(u, ind) + [f"{ind}rp{u} = xb + (hb + {u}) * W + ww"]
        for dw in R:
            L.append(f"{ind}x{u}_{n(dw)} = tl.load(rp{u} + {dw}, mask=c_{n(dw)} & rv{u}, other=0.0).to(tl.float32)")
    for u, ind in row_steps(L):
        # output row hin + e gets tap d = -e: a_k_e += Σ_dw w_k[-e, dw] · x[hin, w + dw]
        for k in range(NK):
            for e in R:
                d = -e
                for dw in R:
                    L.append(f"{ind}if {guard(k, d, dw)}:")
                    L.append(f"{ind}    a{k}_{n(e)} += w{k}_{n(d)}_{n(dw)} * x{u}_{n(dw)}")
        L.append(f"{ind}om = wv & (hv{u} - 2 >= h0) & (hv{u} - 2 < h1)")
        for k in range(NK):
            L.append(f"{ind}if NOUT > {k}:")
            L.append(
                f"{ind}    tl.store(o{k}_ptr + plane * HW + (hb + {u} - 2) * W + ww, a{k}_m2.to(o{k}_ptr.dtype.element_ty), mask=om)"
            )
        for k in range(NK):
            L += roll(f"a{k}", ind)
    return L


def dx():
    L = header(
        "_dw_dx_roll", "g0_ptr, g1_ptr, g2_ptr, w0_ptr, w1_ptr, w2_ptr, dx_ptr, H, W, RCHUNK, ACC: tl.constexpr", rows=True
    )
    L += guards() + weights() + colmasks(-1)
    for e in R:
        L.append(f"    a_{n(e)} = tl.zeros([BW], dtype=tl.float32)")
    L += [
        "    h0 = split * RCHUNK",
        "    h1 = tl.minimum(h0 + RCHUNK, H)",
        "    for hb in range(h0 - 2, h1 + 2, ROWS):",
    ]
    # dx[o, w] = Σ_k Σ_{d,dw} w_k[d, dw] g_k[o - d, w - dw]; input row hin feeds output row hin + d.
    # The gradient rows of all ROWS steps are loaded first (as in the forward).
    for u, ind in row_steps(L):
        L += row_index(u, ind)
        for k in range(NK):
            L.append(f"{ind}rp{k} = g{k}_ptr + plane * HW + (hb + {u}) * W + ww")
            for dw in R:
                L.append(f"{ind}if (NOUT > {k}) & ({dw * dw} <= (KW{k} // 2) * (KW{k} // 2)):")
                L.append(f"{ind}    g{u}{k}_{n(dw)} = tl.load(rp{k} - {dw}, mask=c_{n(dw)} & rv{u}, other=0.0).to(tl.float32)")
                L.append(f"{ind}else:")
                L.append(f"{ind}    g{u}{k}_{n(dw)} = tl.zeros([BW], dtype=tl.float32)")
    for u, ind in row_steps(L):
        for e in R:
            d = e
            for k in range(NK):
                for dw in R:
                    L.append(f"{ind}if {guard(k, d, dw)}:")
                    L.append(f"{ind}    a_{n(e)} += w{k}_{n(d)}_{n(dw)} * g{u}{k}_{n(dw)}")
        L += [
            f"{ind}om = wv & (hv{u} - 2 >= h0) & (hv{u} - 2 < h1)",
            f"{ind}optr = dx_ptr + plane * HW + (hb + {u} - 2) * W + ww",
            f"{ind}if ACC:",
            f"{ind}    a_m2 += tl.load(optr, mask=om, other=0.0).to(tl.float32)",
            f"{ind}tl.store(optr, a_m2.to(dx_ptr.dtype.element_ty), mask=om)",
        ] + roll("a", ind)
    return L


def dwk():
    L = header("_dw_dw_roll", "x_ptr, g0_ptr, g1_ptr, g2_ptr, p0_ptr, p1_ptr, p2_ptr, H, W, RCHUNK, NPLANES")
    L += guards() + colmasks()
    for k in range(NK):
        for d in R:
            for dw in R:
                L.append(f"    s{k}_{n(d)}_{n(dw)} = tl.zeros([BW], dtype=tl.float32)")
    # ring of g rows hin - d (d = -2..2) i.e. rows hin+2 .. hin-2; r_e holds row hin + e
    for k in range(NK):
        for e in R:
            L.append(f"    r{k}_{n(e)} = tl.zeros([BW], dtype=tl.float32)")
    L += [
        "    h0 = split * RCHUNK",
        "    h1 = tl.minimum(h0 + RCHUNK, H)",
        "    xb = x_ptr + plane * HW",
        "    for hin in range(h0 - 2, h1 + 2):",
        "        hv = ww * 0 + hin",
        "        rv = (hv >= 0) & (hv < H)",
        "        gin = hin + 2",
        "        gv = wv & (hv + 2 >= h0) & (hv + 2 < h1)",
    ]
    # dW_k[d, dw] = Σ_{o in chunk} Σ_w g_k[o, w] · x[o + d, w + dw]; x row hin pairs with g row hin - d
    for k in range(NK):
        L.append(f"        r{k}_m2 = r{k}_m1")
        L.append(f"        r{k}_m1 = r{k}_p0")
        L.append(f"        r{k}_p0 = r{k}_p1")
        L.append(f"        r{k}_p1 = r{k}_p2")
        L.append(f"        if NOUT > {k}:")
        L.append(f"            r{k}_p2 = tl.load(g{k}_ptr + plane * HW + gin * W + ww, mask=gv, other=0.0).to(tl.float32)")
        L.append("        else:")
        L.append(f"            r{k}_p2 = tl.zeros([BW], dtype=tl.float32)")
    L.append("        rp = xb + hin * W + ww")
    for dw in R:
        L.append(f"        x_{n(dw)} = tl.load(rp + {dw}, mask=c_{n(dw)} & rv, other=0.0).to(tl.float32)")
    for k in range(NK):
        for d in R:
            for dw in R:
                L.append(f"        if {guard(k, d, dw)}:")
                L.append(f"            s{k}_{n(d)}_{n(dw)} += x_{n(dw)} * r{k}_{n(-d)}")
    L.append("    prow = (split * tl.num_programs(2) + tl.program_id(2)).to(tl.int64) * NPLANES + plane")
    for k in range(NK):
        for d in R:
            for dw in R:
                L.append(f"    if {guard(k, d, dw)}:")
                L.append(
                    f"        tl.store(p{k}_ptr + prow * (KH{k} * KW{k}) + (({d} + KH{k} // 2) * KW{k} + {dw} + KW{k} // 2), tl.sum(s{k}_{n(d)}_{n(dw)}, 0))"
                )
    return L


#: the folder this script writes, all of it
OUT = Path(__file__).with_name("generated")
HEADER = '"""GENERATED by ``python -m dcm.kernels._gen_rolling`` -- do not edit by hand.'


def render() -> str:
    """The text of ``generated/dynconv_rolling.py``."""
    text = [
        HEADER,
        "",
        "Rolling-row Triton kernels for up to three depthwise kernel sets of size ≤ 5×5 (see",
        ":mod:`dcm.kernels.dynamic_conv`). One program owns a column block of ``BW`` positions of one",
        "``(b, c)`` plane and a chunk of ``RCHUNK`` rows; it walks down the rows loading each input row",
        "once at its five column shifts and keeps the five partial output rows (forward / dx) or the",
        "five last gradient rows (dW) in registers, so every input element is loaded ~5 times from L1",
        "instead of once per tap. The forward and dx kernels load ``ROWS`` (1 to 4) input rows per loop",
        "step before storing that step's output rows, so that ``ROWS`` row loads are in flight at once.",
        '"""',
        "import triton",
        "import triton.language as tl",
        "",
        "",
    ]
    for f in (fwd, dx, dwk):
        text += f() + ["", ""]
    return "\n".join(text).rstrip() + "\n"


def files() -> dict:
    """``{file name: text}`` of every file of :data:`OUT`."""
    init = [HEADER, "", "Generated Triton kernels of :mod:`dcm.kernels` (the generator: ``dcm/kernels/_gen_rolling.py``).", '"""']
    return {"__init__.py": "\n".join(init) + "\n", "dynconv_rolling.py": render()}


def main():
    OUT.mkdir(exist_ok=True)
    for name, text in files().items():
        (OUT / name).write_text(text)


if __name__ == "__main__":
    main()
