"""The classic Keras Fashion-MNIST CNN, retrained, evaluated and shipped with PyTorch Lightning."""

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
