import duquant_jax


def test_public_names_exist():
  for name in duquant_jax.__all__:
    assert hasattr(duquant_jax, name), name
  assert callable(duquant_jax.quantize_params)
  from duquant_jax.calibrate import calibrate
  assert callable(calibrate)
