"""`fmnist serve`: the model behind HTTP on LitServe. The API the inference workers run, the front desk every
request passes, the Prometheus metrics, and the server put together from them."""
