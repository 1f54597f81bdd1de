"""Camera students: image backbones, BEV encoders and the student registry."""
