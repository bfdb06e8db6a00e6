"""dmvae-study: the prior-selection study of Distribution Matching VAE (arXiv 2512.07778).

The library: models, objectives, samplers, metrics, data, configs, artifact store and reports.
It never imports from `trainers/` or `studies/`, and never imports Ray in models or objectives.
"""

__version__ = "0.1.0"
