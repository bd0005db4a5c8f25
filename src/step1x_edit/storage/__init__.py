"""Where output images live behind signed, expiring links."""
