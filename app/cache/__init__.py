"""The response cache (`store`), the coalescing of identical requests in flight
(`coalescing`), and the layer that puts both around a backend (`layer`)."""
