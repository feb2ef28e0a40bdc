import { createApp } from "vue";
import App from "./App.vue";
import { unlockAudioOnGesture } from "./notify";
import { router } from "./router";
import { boot } from "./store";
import "./style.css";

unlockAudioOnGesture();
createApp(App).use(router).mount("#app");
void boot();
