"""Scratch (not committed): which transposed SMEM store forms work on this jax."""
import traceback, jax, jax.numpy as jnp, numpy as np
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
print(jax.__version__)
tn, tm = 64, 64
x = jnp.arange(tn * tm, dtype=jnp.float32).reshape(tn, tm) / 7

def make(variant, dtype=jnp.bfloat16):
  swz = 128
  def body(x_gmem, o_gmem, x_smem, o_smem, bar):
    b = bar.at[0] if bar.shape else bar
    plgpu.copy_gmem_to_smem(x_gmem, x_smem, b)
    plgpu.barrier_wait(b)
    y = plgpu.load(x_smem, (), layout=plgpu.Layout.WGMMA).astype(dtype)
    if variant == "transpose_ref_T":
      plgpu.transpose_ref(o_smem, (1, 0))[...] = plgpu.layout_cast(y, plgpu.Layout.WGMMA_TRANSPOSED)
    elif variant == "dotT_T":
      o_smem.T[...] = plgpu.layout_cast(y, plgpu.Layout.WGMMA_TRANSPOSED)
    elif variant == "dotT_plain":
      o_smem.T[...] = y
    elif variant == "swz_dotT_T":
      o_smem.T[...] = plgpu.layout_cast(y, plgpu.Layout.WGMMA_TRANSPOSED)
    elif variant == "value_T":
      o_smem[...] = y.T
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem)
    plgpu.wait_smem_to_gmem(0)
  tr = (plgpu.TilingTransform((8, swz // 2)), plgpu.SwizzleTransform(swz)) if variant.startswith("swz") else ()
  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((tm, tn), dtype),
                      scratch_types=[plgpu.SMEM((tn, tm), jnp.float32), plgpu.SMEM((tm, tn), dtype, transforms=tr),
                                     plgpu.Barrier(num_arrivals=1)])

for v in ["transpose_ref_T", "dotT_T", "dotT_plain", "swz_dotT_T", "value_T"]:
  try:
    y = jax.jit(make(v))(x)
    print(v, "OK exact" if np.array_equal(np.asarray(y, np.float32), np.asarray(x.T.astype(jnp.bfloat16), np.float32)) else "WRONG")
  except Exception as e:
    print(v, "FAIL", type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
