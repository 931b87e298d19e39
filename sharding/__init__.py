"""Device meshes and the rules that map the model's logical axis names onto mesh axes."""
