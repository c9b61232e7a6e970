package console

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"sync"
	"unicode/utf8"

	"golang.org/x/crypto/argon2"
)

// Argon2id settings for new password hashes (RFC 9106's second
// recommended option: 64 MiB, three passes). The settings are stored in
// each hash, so they can be raised without invalidating old ones.
const (
	argonTime    = 3
	argonMemory  = 64 << 10 // KiB
	argonThreads = 2
	argonKeyLen  = 32
	saltLen      = 16
)

// Password length bounds, in characters.
const (
	MinPasswordLen = 12
	MaxPasswordLen = 256
)

// CheckPassword says why a password cannot be used, or returns nil.
func CheckPassword(pw string) error {
	n := utf8.RuneCountInString(pw)
	switch {
	case !utf8.ValidString(pw):
		return errors.New("the password is not valid UTF-8")
	case n < MinPasswordLen:
		return fmt.Errorf("the password has %d characters: use at least %d", n, MinPasswordLen)
	case n > MaxPasswordLen:
		return fmt.Errorf("the password has %d characters: use at most %d", n, MaxPasswordLen)
	}
	return nil
}

// HashPassword returns the argon2id hash of pw in the PHC string format:
// $argon2id$v=19$m=65536,t=3,p=2$<salt>$<key>.
func HashPassword(pw string) (string, error) {
	if err := CheckPassword(pw); err != nil {
		return "", err
	}
	return hashPassword(pw, argonTime, argonMemory, argonThreads), nil
}

func hashPassword(pw string, time, memory uint32, threads uint8) string {
	salt := make([]byte, saltLen)
	rand.Read(salt) // never fails
	key := argon2.IDKey([]byte(pw), salt, time, memory, threads, argonKeyLen)
	enc := base64.RawStdEncoding
	return fmt.Sprintf("$argon2id$v=%d$m=%d,t=%d,p=%d$%s$%s", argon2.Version, memory, time, threads,
		enc.EncodeToString(salt), enc.EncodeToString(key))
}

// dummyHash is verified against when a name is unknown, so that the
// answer takes as long as for a known one.
var dummyHash = sync.OnceValue(func() string {
	return hashPassword("not the password of anyone", argonTime, argonMemory, argonThreads)
})

// errBadHash is returned for a stored hash that cannot be read.
var errBadHash = errors.New("stored password hash is not an argon2id hash")

// VerifyPassword reports whether pw matches hash, comparing in constant
// time. A malformed hash is an error.
func VerifyPassword(hash, pw string) (bool, error) {
	parts := strings.Split(hash, "$")
	if len(parts) != 6 || parts[0] != "" || parts[1] != "argon2id" {
		return false, errBadHash
	}
	var (
		version, mem, iter int
		threads            uint8
	)
	if _, err := fmt.Sscanf(parts[2], "v=%d", &version); err != nil || version != argon2.Version {
		return false, errBadHash
	}
	if _, err := fmt.Sscanf(parts[3], "m=%d,t=%d,p=%d", &mem, &iter, &threads); err != nil ||
		mem < 8 || mem > 1<<22 || iter < 1 || iter > 100 || threads < 1 {
		return false, errBadHash
	}
	enc := base64.RawStdEncoding
	salt, err := enc.DecodeString(parts[4])
	if err != nil || len(salt) < 8 {
		return false, errBadHash
	}
	want, err := enc.DecodeString(parts[5])
	if err != nil || len(want) < 16 || len(want) > 64 {
		return false, errBadHash
	}
	got := argon2.IDKey([]byte(pw), salt, uint32(iter), uint32(mem), threads, uint32(len(want)))
	return subtle.ConstantTimeCompare(got, want) == 1, nil
}

// ValidAnalystName reports whether name can name an analyst: 1 to 64
// characters from [a-z0-9._-], starting with a letter or digit.
func ValidAnalystName(name string) bool {
	if name == "" || len(name) > 64 {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case (c == '.' || c == '_' || c == '-') && i > 0:
		default:
			return false
		}
	}
	return true
}
