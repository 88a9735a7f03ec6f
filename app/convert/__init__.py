"""Offline model work (`model-gateway prepare-model`, `convert`): needs the `convert` extra
(torch, transformers); serving never imports it."""
