package console

// HashPasswordCheap hashes with argon2id at 1 MiB and one pass, so that
// tests under the race detector sign in quickly; VerifyPassword reads the
// parameters from the hash.
func HashPasswordCheap(pw string) string { return hashPassword(pw, 1, 1024, 1) }
