"""Maintainer tools: training the reference models, model cards, the policy and cache
reports, the overhead benchmark, the generated reference page and the shape check."""
