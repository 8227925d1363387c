"""restic's cryptography (AES-256-CTR + Poly1305-AES), key files, and the 64-digit key."""
