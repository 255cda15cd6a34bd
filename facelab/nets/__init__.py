"""Network building blocks: timm encoders, heads, graph convolutions, discriminators, identity net."""
