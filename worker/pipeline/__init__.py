"""Frames to rows, without a database: decoding, face detection and crops, the emotion model, tracking."""
