// Session and HTTP API. The access token lives in memory only; the refresh token in
// sessionStorage (this tab, gone when it closes). Neither ever goes into a URL.

const REFRESH_KEY = "presenced.refresh";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code);
    this.status = status;
    this.code = code;
  }
}

export class Session {
  constructor(onLoggedOut) {
    this.access = null;
    this.user = null;
    this.expiresAt = 0;
    this.timer = null;
    this.refreshing = null;
    this.onLoggedOut = onLoggedOut;
  }

  get loggedIn() {
    return this.access !== null;
  }

  /** The current access token (the socket asks on every connect). */
  token() {
    return this.access || "";
  }

  accept(pair) {
    this.access = pair.access_token;
    this.user = pair.user;
    this.expiresAt = Date.now() + pair.expires_in * 1000;
    try {
      sessionStorage.setItem(REFRESH_KEY, pair.refresh_token);
    } catch (_) {
      // Storage may be unavailable (private mode): the session then lasts until reload.
    }
    clearTimeout(this.timer);
    // Refresh at 80 % of the lifetime, at least 1 s from now.
    const inMs = Math.max(1000, pair.expires_in * 800);
    this.timer = setTimeout(() => this.refresh().catch(() => {}), inMs);
  }

  async login(email, password) {
    const res = await fetch("/api/v1/auth/login", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ email, password }),
    });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) {
      throw new ApiError(res.status, body.error || "error", body.message || res.statusText);
    }
    this.accept(body);
    return body.user;
  }

  /** Restores a session of this tab from its refresh token, if any. */
  async resume() {
    let stored = null;
    try {
      stored = sessionStorage.getItem(REFRESH_KEY);
    } catch (_) {
      stored = null;
    }
    if (!stored) return false;
    try {
      await this.refresh();
      return true;
    } catch (_) {
      return false;
    }
  }

  /** One refresh at a time; concurrent callers share it. */
  refresh() {
    if (this.refreshing) return this.refreshing;
    this.refreshing = (async () => {
      let token = null;
      try {
        token = sessionStorage.getItem(REFRESH_KEY);
      } catch (_) {
        token = null;
      }
      if (!token) throw new ApiError(401, "no_session", "not logged in");
      const res = await fetch("/api/v1/auth/refresh", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ refresh_token: token }),
      });
      const body = await res.json().catch(() => ({}));
      if (res.status === 401) {
        this.clear();
        this.onLoggedOut("Your session ended; please log in again.");
        throw new ApiError(401, body.error || "invalid_refresh_token", body.message);
      }
      if (!res.ok) {
        // The server is unreachable or overloaded: keep the session, try again soon.
        clearTimeout(this.timer);
        this.timer = setTimeout(() => this.refresh().catch(() => {}), 3000);
        throw new ApiError(res.status, body.error || "error", body.message);
      }
      this.accept(body);
      return body;
    })();
    const done = () => {
      this.refreshing = null;
    };
    this.refreshing.then(done, done);
    return this.refreshing;
  }

  /** Refreshes now if the access token is expired or about to be. */
  async fresh() {
    if (this.access && Date.now() > this.expiresAt - 5000) {
      await this.refresh();
    }
  }

  async logout() {
    let token = null;
    try {
      token = sessionStorage.getItem(REFRESH_KEY);
    } catch (_) {
      token = null;
    }
    if (token && this.access) {
      await fetch("/api/v1/auth/logout", {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${this.access}` },
        body: JSON.stringify({ refresh_token: token }),
      }).catch(() => {});
    }
    this.clear();
  }

  clear() {
    clearTimeout(this.timer);
    this.access = null;
    this.user = null;
    try {
      sessionStorage.removeItem(REFRESH_KEY);
    } catch (_) {
      // nothing to remove
    }
  }

  /** A JSON API call; an expired token is refreshed once and the call retried. */
  async api(method, path, body) {
    await this.fresh().catch(() => {});
    for (let attempt = 0; attempt < 2; attempt++) {
      const res = await fetch(`/api/v1${path}`, {
        method,
        headers: {
          authorization: `Bearer ${this.access || ""}`,
          ...(body === undefined ? {} : { "content-type": "application/json" }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      if (res.status === 204) return null;
      const data = await res.json().catch(() => ({}));
      if (res.ok) return data;
      const expired = ["token_expired", "token_revoked"].includes(data.error);
      if (res.status === 401 && expired && attempt === 0) {
        await this.refresh();
        continue;
      }
      throw new ApiError(res.status, data.error || "error", data.message || res.statusText);
    }
    throw new ApiError(401, "unauthorized", "not logged in");
  }
}
