package consent

import (
	_ "embed"
	"strings"
)

// StatementVersion is the version of the Security Network Statement this
// agent ships. Bump it whenever the collected fields change: a participant
// who accepted an older version is paused until they accept this one.
const StatementVersion = 1

//go:embed statement.md
var statementText string

// StatementTitle is the statement's title as shown to a person.
const StatementTitle = "Security Network Statement"

// StatementSummary is the short form the tray shows in a confirmation.
const StatementSummary = "Share anonymised statistics about the programs that run on this computer " +
	"(file hashes, sizes, paths without your user name, execution counts) " +
	"with the Security Network, and get up-to-date reputation for them. " +
	"Never file contents, arguments or user names. You can stop at any time."

// Statement returns the full text of the Security Network Statement.
func Statement() string { return statementText }

// StatementMentions reports whether the statement names a collected field
// (written as `field` in its table).
func StatementMentions(field string) bool {
	return strings.Contains(statementText, "`"+field+"`")
}
