"""Training and evaluation of the captioner on public datasets and on people's corrections."""
