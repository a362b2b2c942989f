"""The research harness: measurements of quantized policies, not part of the conversion pipeline.

- `synthetic`: demo-model weights with realistic outlier statistics (`realistic_params`);
- `synthetic_stats`: calibration stats of the right shapes for timing the packer;
- `demo`: the main job on the demo model (calibrate, quantize, compare with FP);
- `evaluate`: fidelity to the FP policy (action error, closed-loop drift, per-layer error);
- `diagnose`: head structure of the attention projections and what quantization does to it.

The library (`duquant_jax`) never imports this package; it imports the library. Plots need the
`lab` extra (`pip install 'duquant-jax[lab]'`: matplotlib).
"""
