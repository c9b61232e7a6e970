package agent

import "context"

// wakeSenders wakes the parts that reach the cloud (the installation,
// the uploader and the reputation checker) whenever consent or the policy
// changes: the server, its certificate authorities. While no server can
// be used they sleep without retrying; a change of configuration is what
// can end that.
func (a *Agent) wakeSenders(ctx context.Context) error {
	changed, cancel := a.consent.Subscribe()
	defer cancel()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
			a.onConsentChange()
		}
	}
}
