"""The composefs image format (EROFS + composefs header): layout, writer and reader."""
